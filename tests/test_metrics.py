"""/metrics: open in development, the admin key's alone in production or when the setting says so."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from conftest import ADMIN_KEY, KEY, auth, settings


@pytest.mark.parametrize("overrides,needs_key", [
    ({}, False),
    ({"env": "production"}, True),
    ({"metrics_need_key": True}, True),
    ({"env": "production", "metrics_need_key": False}, False),
])
def test_metrics_key_setting(redis_servers, overrides, needs_key):
    from app.main import create_app

    with TestClient(create_app(settings(**overrides))) as c:
        assert c.get("/metrics").status_code == (401 if needs_key else 200)
        if needs_key:
            assert c.get("/metrics", headers=auth(KEY)).status_code == 403  # a tenant's key is not enough
            r = c.get("/metrics", headers=auth(ADMIN_KEY))
            assert r.status_code == 200 and "mamlserve_queue_depth" in r.text
