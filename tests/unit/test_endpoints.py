import pytest

from inferoute.endpoints import Endpoint, hostport, parse_endpoints, split_hostport
from inferoute.errors import InferouteError


def test_parse_endpoints_and_keys() -> None:
    eps = parse_endpoints(
        [
            {"name": "a", "address": "10.0.0.1", "port": 8000, "labels": {"x": 1}},
            {"address": "::1", "port": 9000},
        ]
    )
    assert eps[0] == Endpoint("a", "10.0.0.1", 8000, {"x": "1"})
    assert eps[0].key == "10.0.0.1:8000"
    assert eps[1].key == "[::1]:9000" and eps[1].name == "[::1]:9000"


@pytest.mark.parametrize(
    "raw,needle",
    [
        ([{"address": "1.2.3.4"}], "port"),
        ([{"port": 1}], "address"),
        ([{"address": "a", "port": 1, "bogus": 2}], "bogus"),
        ([{"address": "a", "port": 1}, {"address": "a", "port": 1}], "duplicate"),
        ("nope", "list"),
    ],
)
def test_parse_endpoints_errors_name_the_key(raw: object, needle: str) -> None:
    with pytest.raises(InferouteError) as exc:
        parse_endpoints(raw)
    assert needle in exc.value.message


def test_split_hostport() -> None:
    assert split_hostport("1.2.3.4:80") == ("1.2.3.4", 80)
    assert split_hostport("1.2.3.4") == ("1.2.3.4", None)
    assert split_hostport("[::1]:80") == ("::1", 80)
    assert hostport("::1", 80) == "[::1]:80"
