"""Reports on known usage records: the query, JSON, CSV, the CLI's table and the
admin API (with its auth), all against figures checked by hand."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.db import get_engine, migrate
from gateway.reports import parse_group_by, usage_report
from gateway.settings import Settings, get_settings
from tests.support.usage_data import DAY1, NEXT_MONTH, seed_known_usage

ADMIN = "admin-reports-key"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def engine(data_dir: Path) -> Iterator[Engine]:
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'bearpaw.db'}"
    migrate(url)
    engine = get_engine(url)
    seed_known_usage(engine)
    yield engine


def test_per_tenant(engine: Engine) -> None:
    report = usage_report(engine, ["tenant"])
    rows = {r.group["tenant"]: r for r in report.rows}
    acme, globex = rows["acme"], rows["globex"]
    assert (acme.requests, acme.errors, acme.cache_hits) == (4, 1, 1)
    assert (acme.prompt_tokens, acme.completion_tokens, acme.cached_tokens) == (1200, 600, 150)
    # What the backends processed: the cache hit's tokens are not among them.
    assert (acme.backend_prompt_tokens, acme.backend_completion_tokens) == (1100, 550)
    assert acme.cost_usd == pytest.approx(1.80)
    assert acme.cost_avoided_usd == pytest.approx(0.30)
    assert acme.batch_discount_usd == pytest.approx(1.50)
    assert (globex.requests, globex.total_tokens) == (2, 17)
    assert globex.cost_usd == pytest.approx(9.03)
    assert report.totals.cost_usd == pytest.approx(10.83)


def test_per_model_and_day_with_window_and_tenant(engine: Engine, data_dir: Path) -> None:
    by_model = usage_report(engine, ["model"], end=NEXT_MONTH)
    assert {r.group["model"]: r.total_tokens for r in by_model.rows} == {
        "big": 1500,
        "small": 315,
    }
    by_day = usage_report(engine, ["day"], start=DAY1, end=NEXT_MONTH)
    assert [(r.group["day"], r.requests, round(r.cost_usd, 2)) for r in by_day.rows] == [
        ("2026-03-01", 2, 0.30),
        ("2026-03-02", 3, 1.53),
    ]
    # A tenant by name or by id; two dimensions at once.
    both = usage_report(engine, ["day", "model"], tenant="globex")
    assert [(r.group["day"], r.group["model"]) for r in both.rows] == [
        ("2026-03-02", "small"),
        ("2026-04-01", "big"),
    ]
    ids = usage_report(engine, ["tenant"], tenant=_tenant_id(engine, "globex"))
    assert [r.group["tenant"] for r in ids.rows] == ["globex"]


def _tenant_id(engine: Engine, name: str) -> str:
    from gateway import tenants as svc

    return svc.get_tenant(engine, name).id


def test_group_by_is_validated() -> None:
    assert parse_group_by("tenant, day,tenant") == ["tenant", "day"]
    with pytest.raises(ValueError):
        parse_group_by("colour")


def test_json_and_csv(engine: Engine) -> None:
    report = usage_report(engine, ["model"], tenant="acme")
    data = report.as_dict()
    assert data["object"] == "bearpaw.usage_report"
    assert [d["model"] for d in data["data"]] == ["big", "small"]
    assert data["totals"]["total_tokens"] == 1800
    assert data["totals"]["batch_discount_usd"] == pytest.approx(1.5)
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert list(rows[0]) == report.columns()
    assert rows[0]["model"] == "big" and rows[0]["cost_usd"] == "1.500000"
    assert rows[1]["cached_tokens"] == "150" and rows[1]["cost_avoided_usd"] == "0.300000"


@pytest.fixture
def cli_env(engine: Engine, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BEARPAW_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_report(cli_env: None) -> None:
    from gateway.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["report", "--since", "2026-01-01", "--format", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["totals"]["requests"] == 6
    assert data["totals"]["cost_usd"] == pytest.approx(10.83)

    out = runner.invoke(
        app, ["report", "-g", "day", "-f", "csv", "--since", "2026-03-01", "--until", "2026-04-01"]
    )
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[0].startswith("day,requests,errors")
    assert [line.split(",")[0] for line in lines[1:]] == ["2026-03-01", "2026-03-02"]

    out = runner.invoke(
        app, ["report", "--since", "2026-01-01", "--tenant", "acme"], env={"COLUMNS": "200"}
    )
    assert out.exit_code == 0, out.output
    assert "acme" in out.output and "globex" not in out.output
    assert "TOTAL" in out.output and "1.800000" in out.output

    # The default window is the current month: the 2026 records are not in it.
    out = runner.invoke(app, ["report", "-f", "json", "--tenant", "acme"])
    assert json.loads(out.output)["totals"]["requests"] in (0, 4)

    bad = runner.invoke(app, ["report", "--group-by", "colour"])
    assert bad.exit_code != 0


@pytest.fixture
def client(engine: Engine, data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=data_dir,
        admin_key=ADMIN,
        cache={"enabled": False},
        backends={"discover": []},
        workers={"embedded": False},
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_admin_api_json_csv_and_auth(client: TestClient) -> None:
    auth = {"authorization": f"Bearer {ADMIN}"}
    r = client.get("/admin/reports/usage", params={"group_by": "tenant"}, headers=auth)
    assert r.status_code == 200
    body = r.json()
    assert [row["tenant"] for row in body["data"]] == ["acme", "globex"]
    assert body["totals"]["cost_avoided_usd"] == pytest.approx(0.3)

    r = client.get(
        "/admin/reports/usage",
        params={"group_by": "day", "tenant": "acme", "format": "csv", "start": "2026-03-02"},
        headers=auth,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(row["day"], row["requests"], row["errors"]) for row in rows] == [
        ("2026-03-02", "2", "1")
    ]

    assert client.get("/admin/reports/usage").status_code == 401
    wrong = {"authorization": "Bearer nope"}
    assert client.get("/admin/reports/usage", headers=wrong).status_code == 401
    r = client.get("/admin/reports/usage", params={"group_by": "colour"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "group_by"
    r = client.get("/admin/reports/usage", params={"start": "yesterday"}, headers=auth)
    assert r.status_code == 400


def test_page_login_flow(client: TestClient) -> None:
    r = client.get("/admin/reports/page", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin/reports/login"
    r = client.post("/admin/reports/login", data={"key": "nope"}, follow_redirects=False)
    assert r.headers["location"].endswith("error=1")
    r = client.post("/admin/reports/login", data={"key": ADMIN}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.cookies.get("bearpaw_admin")
    assert cookie and ADMIN not in cookie  # an HMAC of the key, not the key
    page = client.get("/admin/reports/page", params={"start": "2026-03-01"})
    assert page.status_code == 200 and "chart-cost-by-day" in page.text
    # The cookie also opens the JSON API, so the page's links work.
    assert client.get("/admin/reports/usage").status_code == 200
    # ?key= signs in and drops the key from the URL.
    client.cookies.clear()
    r = client.get(
        "/admin/reports/page", params={"key": ADMIN, "tenant": "acme"}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/admin/reports/page?tenant=acme"
