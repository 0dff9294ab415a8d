import json

from inferoute.errors import InferouteError, error_body, error_type


def test_error_body_is_openai_shape() -> None:
    body = json.loads(error_body(503, "no ready endpoints"))
    assert body == {
        "error": {
            "message": "no ready endpoints",
            "type": "service_unavailable_error",
            "param": None,
            "code": 503,
        }
    }


def test_error_types() -> None:
    assert error_type(429) == "rate_limit_error"
    assert error_type(418) == "invalid_request_error"
    assert error_type(599) == "internal_server_error"


def test_inferoute_error_body_and_str() -> None:
    err = InferouteError(413, "body too large", cause="body-too-large")
    assert json.loads(err.body())["error"]["code"] == 413
    assert "body-too-large" in str(err)
