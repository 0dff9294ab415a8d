"""Request control: the per-request glue around scheduling (parsing, control headers, response accounting).

* :mod:`.parse` — typed decode of only the fields the picker needs (model, prompt/messages as raw bytes).
* :mod:`.usage` — token usage from the tail of a response (SSE ``usage`` chunk or JSON body).
The sequence itself (parse → rewrite → objective → candidates → admission → schedule → learn) is
:class:`inferoute.epp.requestcontrol.director.Director`.
"""
