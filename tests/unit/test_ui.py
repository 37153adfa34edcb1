"""The dashboard: the SVG plot helper (pure) and the /ui pages (TestClient, real DB)."""

from __future__ import annotations

import re

from api.ui.plots import Series, line_plot, metric_series, nice_ticks
from tests.conftest import upload


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 48) == [0, 10, 20, 30, 40]
    assert nice_ticks(0.62, 1.71) == [0.75, 1.0, 1.25, 1.5]
    assert nice_ticks(3, 3) == [3]


def test_metric_series_shifts_each_phase_after_the_previous_ones():
    events = [
        {"phase": "teacher", "step": 1, "total_steps": 10, "loss": 2.0, "epsilon": 0.1},
        {"phase": "teacher", "step": 10, "total_steps": 10, "loss": 1.0, "epsilon": 1.0},
        {"phase": "student", "step": 1, "total_steps": 5, "loss": float("nan"), "epsilon": 1.2},
        {"phase": "student", "step": 5, "total_steps": 5, "loss": 0.5, "epsilon": 2.0},
    ]
    loss = metric_series(events, "loss")
    assert [(s.name, s.points) for s in loss] == [
        ("teacher", [(1.0, 2.0), (10.0, 1.0)]),
        ("student", [(15.0, 0.5)]),
    ]
    eps = metric_series(events, "epsilon")
    assert eps[1].points == [(11.0, 1.2), (15.0, 2.0)]


def test_line_plot_draws_a_point_per_value_and_escapes_text():
    svg = line_plot(
        [Series("<b>train</b>", [(1, 0.7), (4, 0.6), (8, 0.65)]), Series("student", [(9, 0.5)])],
        title="loss & <script>",
        x_label="step",
        y_label="loss",
        plot_id="p",
    )
    assert svg.count('class="pt"') == 4 and svg.count("<polyline") == 2
    assert 'data-points="4"' in svg
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&lt;b&gt;train" in svg
    coords = [float(v) for v in re.findall(r'c[xy]="([-\d.]+)"', svg)]
    assert all(0 <= v <= 520 for v in coords)


def test_line_plot_without_data_or_with_a_flat_line():
    assert "no data yet" in line_plot([], title="t", x_label="x", y_label="y", plot_id="e")
    flat = line_plot([Series("s", [(1, 2.0)])], title="t", x_label="x", y_label="y", plot_id="f")
    assert flat.count('class="pt"') == 1 and "nan" not in flat


def _spec(ds_id: str) -> dict:
    return {
        "method": "dp_finetune",
        "dataset_id": ds_id,
        "model": {"base": "tiny:bert"},
        "privacy": {"epsilon": 4.0},
        "training": {"epochs": 1, "batch_size": 16, "max_seq_length": 16},
    }


def test_pages_need_a_key_and_redirect_to_login(client):
    anon = {"Authorization": ""}
    r = client.get("/ui/jobs/job_x?a=1", headers=anon, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%2Fjob_x%3Fa%3D1"
    page = client.get("/ui/login", params={"next": "//evil.example/x"}, headers=anon)
    assert page.status_code == 200 and 'value="/ui/jobs"' in page.text
    bad = client.post("/ui/login", data={"api_key": "nope"}, headers=anon)
    assert bad.status_code == 401 and "invalid or revoked API key" in bad.text


def test_login_sets_a_strict_httponly_cookie(client):
    r = client.post(
        "/ui/login",
        data={"api_key": "test-key-tenant-a", "next": "/ui/datasets"},
        headers={"Authorization": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/datasets"
    cookie = r.headers["set-cookie"].lower()
    assert "dpc_key=test-key-tenant-a" in cookie
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    client.cookies.set("dpc_key", "test-key-tenant-a", path="/ui")
    page = client.get("/ui/datasets", headers={"Authorization": ""})
    assert page.status_code == 200 and "Datasets" in page.text
    assert "script-src" not in page.headers["content-security-policy"]
    out = client.post("/ui/logout", follow_redirects=False)
    assert out.status_code == 303 and 'dpc_key=""' in out.headers["set-cookie"]


def test_pages_escape_names_and_hide_other_tenants(client, other_tenant_key):
    ds = upload(client, name='<img src=x onerror="alert(1)">').json()
    job = client.post("/v1/jobs", json=_spec(ds["id"])).json()
    datasets = client.get("/ui/datasets")
    assert datasets.status_code == 200
    assert "<img src=x" not in datasets.text and "&lt;img src=x" in datasets.text
    assert 'class="spent"' in datasets.text and 'class="reserved"' in datasets.text
    assert "public text</span>" not in datasets.text  # uploads are private unless declared
    upload(client, name="wikitext", public="true")
    assert client.get("/ui/datasets").text.count("public text</span>") == 1
    page = client.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200 and "&lt;img src=x" in page.text
    assert 'id="plot-loss"' in page.text and 'id="plot-epsilon"' in page.text
    # per phase (linear probe, fine-tuning): charged (0 steps) + reserved
    assert page.text.count('class="ledger-row"') == 4
    assert '<meta http-equiv="refresh"' in page.text  # queued: the page refreshes itself
    listing = client.get("/ui/jobs", params={"status": "queued"})
    assert job["id"] in listing.text
    assert job["id"] not in client.get("/ui/jobs", params={"status": "succeeded"}).text

    other = {"Authorization": f"Bearer {other_tenant_key}"}
    hidden = client.get(f"/ui/jobs/{job['id']}", headers=other)
    assert hidden.status_code == 404 and "Not found" in hidden.text
    assert job["id"] not in client.get("/ui/jobs", headers=other).text
    assert ds["id"] not in client.get("/ui/datasets", headers=other).text
    art = client.get(f"/ui/jobs/{job['id']}/artifacts/model.tar.gz", headers=other)
    assert art.status_code == 404
