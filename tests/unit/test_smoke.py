from flask.testing import FlaskClient


def test_health_answers_without_auth(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json["status"] == "healthy"
