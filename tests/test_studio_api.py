"""mergesmith studio, API level: every endpoint through Starlette's TestClient (the merges
run in real worker subprocesses), and the safety rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402
from studio_common import build_models, folder_bytes, slices, task_arithmetic  # noqa: E402

from mergesmith.studio import StudioConfig, create_app  # noqa: E402


@pytest.fixture
def studio(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_EVAL_CACHE", str(tmp_path / "eval-cache"))
    models = build_models(tmp_path / "work")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    config = StudioConfig(workdir=str(tmp_path / "work"), extra_hosts=["testserver"])
    with TestClient(create_app(config)) as client:
        yield client, config, models, outside


def wait_for(client, run_id, statuses, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {statuses}: {run}")


def events(client, run_id):
    out = []
    with client.stream("GET", f"/api/runs/{run_id}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: {}":
                out.append(json.loads(line[6:]))
    return out


# ------------------------------------------------------------------ page, methods, templates


def test_page_static_info(studio):
    client, config, _, _ = studio
    page = client.get("/")
    assert page.status_code == 200 and "mergesmith" in page.text
    assert "content-security-policy" in page.headers
    for asset in ("studio.js", "studio.css", "vendor/codemirror/codemirror.js",
                  "vendor/codemirror/yaml.js", "vendor/codemirror/LICENSE"):
        assert client.get(f"/static/{asset}").status_code == 200, asset
    assert "http" not in client.get("/").text.split("<body>")[0].replace(
        "http-equiv", "")  # no CDN: every asset is local
    info = client.get("/api/info").json()
    assert info["roots"] == [config.workdir] and info["token_required"] is False


def test_methods_and_templates(studio):
    client, _, models, _ = studio
    methods = {m["name"]: m for m in client.get("/api/methods").json()["methods"]}
    assert {"task_arithmetic", "ties", "slerp", "passthrough"} <= set(methods)
    assert any(p["name"] == "weight" for p in methods["task_arithmetic"]["params"])
    assert methods["ties"]["summary"]
    templates = {t["id"]: t["text"] for t in client.get("/api/templates").json()["templates"]}
    assert set(templates) == {"task_arithmetic", "ties", "slerp", "frankenmerge", "moe"}
    for key, text in templates.items():  # filled with the models found: all valid
        r = client.post("/api/check", json={"recipe": text}).json()
        assert r["ok"], (key, r)
    assert str(models["base"]) in templates["task_arithmetic"]


# ------------------------------------------------------------------ check


def test_check_plan_and_layer_map(studio):
    client, _, models, _ = studio
    r = client.post("/api/check", json={"recipe": slices(models)}).json()
    assert r["ok"] and r["plan"]["method"] == "passthrough"
    (lm,) = r["plan"]["layer_maps"]
    assert [layer["output"] for layer in lm["layers"]] == [0, 1, 2, 3]
    assert lm["layers"][2]["inputs"] == [[str(models["ft_b"]), 1]]
    assert any("← " + str(models["ft_b"]) + " [1-2]" in line for line in lm["lines"])
    p = client.post("/api/check", json={"recipe": task_arithmetic(models)}).json()["plan"]
    assert p["tensors"] == 30 and p["bytes_written"] > 0 and p["peak_memory"] > 0
    assert p["seconds"] > 0 and len(p["models"]) == 3


@pytest.mark.parametrize("change, line, field", [
    (("task_arithmetic", "task_arithmatic"), 1, "merge_method"),
    (("weight: 0.3", "wieght: 0.3"), 7, "models[1].parameters.wieght"),
    (("models:", "models: [oops"), 4, None),  # where YAML notices the open list
])
def test_check_errors_at_their_line(studio, change, line, field):
    client, _, models, _ = studio
    r = client.post("/api/check", json={"recipe": task_arithmetic(models).replace(*change)})
    assert r.status_code == 200
    r = r.json()
    assert not r["ok"] and "\n" not in r["error"]
    assert r["line"] == line, r
    if field:
        assert r["field"] == field, r
    if change[1] == "task_arithmatic":
        assert r["fix"] == "did you mean 'task_arithmetic'?"


def test_check_validation(studio):
    client, _, _, _ = studio
    assert client.post("/api/check", json={}).status_code == 400
    assert client.post("/api/check", content=b"not json",
                       headers={"content-type": "application/json"}).status_code == 400
    r = client.post("/api/check", json={"recipe": "  "}).json()
    assert not r["ok"] and "empty" in r["error"]


def test_check_refuses_models_outside_the_roots(studio, tmp_path):
    client, config, models, outside = studio
    shutil.copytree(models["ft_b"], outside / "ft_b")
    recipe = task_arithmetic(models).replace(str(models["ft_b"]), str(outside / "ft_b"))
    r = client.post("/api/check", json={"recipe": recipe})
    assert r.status_code == 403 and "outside" in r.json()["error"]
    r = client.post("/api/runs", json={"recipe": recipe})
    assert r.status_code == 403
    relative = task_arithmetic(models).replace(str(models["ft_b"]), "../outside/ft_b")
    assert client.post("/api/check", json={"recipe": relative}).status_code == 403


# ------------------------------------------------------------------ models and files


def test_models_and_summary(studio):
    client, _, models, outside = studio
    listed = client.get("/api/models").json()["models"]
    assert {m["path"] for m in listed if m["kind"] == "folder"} >= {str(p) for p in
                                                                     models.values()}
    s = client.get("/api/models/summary", params={"ref": str(models["ft_a"])}).json()
    assert s["architecture"] == "LlamaForCausalLM" and s["layers"] == 3
    assert s["dtype"] == "float32" and s["tensors"] == 30 and s["bytes"] > 0
    assert s["quantization"] is None
    r = client.get("/api/models/summary", params={"ref": str(outside)})
    assert r.status_code == 403
    r = client.get("/api/models/summary", params={"ref": "nobody/no-such-model-here"})
    assert r.status_code == 404


def test_files_confined_to_the_roots(studio):
    client, config, models, outside = studio
    work = config.workdir
    os.symlink(outside, os.path.join(work, "link_out"))
    os.symlink(outside / "secret.txt", os.path.join(work, "secret_link"))
    os.symlink(models["ft_a"], os.path.join(work, "link_in"))
    refused = [str(outside / "secret.txt"), "../outside/secret.txt",
               f"{work}/../outside/secret.txt", "link_out/secret.txt", "secret_link",
               "/etc/passwd", "~/.bashrc", "models/../../outside/secret.txt"]
    for path in refused:
        for endpoint in ("/api/file", "/api/files", "/api/trials"):
            r = client.get(endpoint, params={"path": path})
            assert r.status_code == 403, (endpoint, path, r.text)
            assert "secret" != r.text
    assert client.get("/api/files", params={"path": "link_out"}).status_code == 403
    listing = client.get("/api/files", params={"path": "models"}).json()
    assert {e["name"] for e in listing["entries"]} == {"base", "ft_a", "ft_b"}
    assert all(e["model"] for e in listing["entries"])
    got = client.get("/api/file", params={"path": "link_in/config.json"})
    assert got.status_code == 200 and json.loads(got.text)["model_type"] == "llama"
    assert client.get("/api/file", params={"path": "nothing.txt"}).status_code == 404
    assert client.get("/api/file", params={"path": "models"}).status_code == 400
    assert client.get("/api/file", params={"path": "a\x00b"}).status_code == 403


# ------------------------------------------------------------------ safety


def test_other_origins_and_hosts_refused(studio):
    client, _, _, _ = studio
    assert client.get("/api/info", headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/api/info", headers={"origin": "null"}).status_code == 403
    assert client.post("/api/check", json={"recipe": "x"},
                       headers={"origin": "http://localhost:9999"}).status_code == 403
    assert client.get("/api/info", headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert client.get("/api/info", headers={"sec-fetch-site": "same-site"}).status_code == 403
    assert client.get("/api/info", headers={"sec-fetch-site": "same-origin"}).status_code == 200
    assert client.get("/api/info", headers={"origin": "http://testserver"}).status_code == 200
    r = client.get("/api/info", headers={"host": "evil.example"})
    assert r.status_code == 421  # DNS rebinding: a page of evil.example resolving to us
    assert client.get("/api/info", headers={"host": "127.0.0.1:7860"}).status_code == 200


def test_non_local_host_requires_the_token(tmp_path):
    config = StudioConfig(workdir=str(tmp_path), host="0.0.0.0")
    assert config.token and len(config.token) > 20  # generated, printed at start
    with TestClient(create_app(config)) as client:
        r = client.get("/api/info")
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert client.get("/", params={"token": "wrong"}).status_code == 401
        assert client.get("/api/info", headers={"authorization": "Bearer nope"}
                          ).status_code == 401
        ok = client.get("/", params={"token": config.token})
        assert ok.status_code == 200 and "HttpOnly" in ok.headers["set-cookie"]
        assert client.get("/api/info").status_code == 200  # the cookie
    with TestClient(create_app(config)) as client:
        assert client.get("/api/info", headers={"authorization": f"Bearer {config.token}"}
                          ).json()["token_required"] is True
    assert StudioConfig(workdir=str(tmp_path)).token is None


# ------------------------------------------------------------------ runs


def test_merge_streams_progress_to_done_and_equals_run(studio, tmp_path):
    client, config, models, _ = studio
    recipe = task_arithmetic(models)
    r = client.post("/api/runs", json={"recipe": recipe})
    assert r.status_code == 202
    run_id = r.json()["run"]["id"]
    seen = events(client, run_id)
    assert seen[-1]["status"] == "done"
    assert any(e["status"] == "running" for e in seen)
    assert seen[-1]["tensors"] == seen[-1]["total_tensors"] == 30
    assert seen[-1]["bytes"] == seen[-1]["total_bytes"] > 0
    run = client.get(f"/api/runs/{run_id}").json()
    assert run["published"] and not run["partial"] and run["method"] == "task_arithmetic"
    assert "sha256" in run["checksums"] and "task_arithmetic" in run["model_card"]
    assert run["out"] == os.path.join(config.workdir, "runs", run_id, "merged")
    from mergesmith import run as api_run

    (tmp_path / "direct").mkdir()
    api_run(recipe, tmp_path / "direct" / "merged")
    assert folder_bytes(tmp_path / "direct" / "merged") == \
        folder_bytes(tmp_path / "work" / "runs" / run_id / "merged")
    assert run_id in [x["id"] for x in client.get("/api/runs").json()["runs"]]
    history = [json.loads(line) for line in open(os.path.join(
        config.workdir, "studio", "history.jsonl"))]
    assert history[-1]["id"] == run_id and history[-1]["recipe"] == recipe
    assert client.post(f"/api/runs/{run_id}/cancel").status_code == 409
    assert client.post(f"/api/runs/{run_id}/resume").status_code == 409
    with TestClient(create_app(config)) as again:  # the history survives a restart
        assert again.get(f"/api/runs/{run_id}").json()["status"] == "done"


@pytest.fixture
def sigint_ignored():
    """SIGINT ignored, as in a background job of a shell: children inherit it."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_queue_cancel_failure_and_resume(studio, tmp_path, monkeypatch, sigint_ignored):
    client, config, models, _ = studio
    shutil.copytree(models["ft_b"], tmp_path / "work" / "models" / "ft_x")
    monkeypatch.setenv("MERGESMITH_STUDIO_ITEM_DELAY", "0.3")  # a merge slow enough to cancel
    first = client.post("/api/runs", json={"recipe": task_arithmetic(models)}).json()["run"]
    doomed = task_arithmetic({**models, "ft_x": tmp_path / "work" / "models" / "ft_x"}, "ft_x")
    second = client.post("/api/runs", json={"recipe": doomed}).json()["run"]
    third = client.post("/api/runs", json={"recipe": slices(models)}).json()["run"]
    running = wait_for(client, first["id"], {"running"})
    assert running["status"] == "running"
    deadline = time.monotonic() + 60
    while client.get(f"/api/runs/{first['id']}").json()["tensors"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get(f"/api/runs/{second['id']}").json()["status"] == "queued"  # one at a time
    assert client.post(f"/api/runs/{third['id']}/cancel").json()["run"]["status"] == "cancelled"
    shutil.rmtree(tmp_path / "work" / "models" / "ft_x")  # the second run will fail
    assert client.post(f"/api/runs/{first['id']}/cancel").status_code == 200
    cancelled = wait_for(client, first["id"], {"cancelled", "done", "failed"})
    assert cancelled["status"] == "cancelled", cancelled
    assert not os.path.exists(cancelled["out"]) and not cancelled["published"]
    assert cancelled["partial"]  # finished tensors kept for Resume
    failed = wait_for(client, second["id"], {"done", "failed", "cancelled"})
    assert failed["status"] == "failed" and "ft_x" in failed["error"]
    assert "\n" not in failed["error"]
    monkeypatch.delenv("MERGESMITH_STUDIO_ITEM_DELAY")
    assert client.post(f"/api/runs/{first['id']}/resume").status_code == 202
    done = wait_for(client, first["id"], {"done", "failed", "cancelled"})
    assert done["status"] == "done" and done["published"] and not done["partial"]
    from mergesmith import run as api_run

    (tmp_path / "direct").mkdir()
    api_run(task_arithmetic(models), tmp_path / "direct" / "merged")
    assert folder_bytes(tmp_path / "direct" / "merged") == folder_bytes(
        tmp_path / "work" / "runs" / first["id"] / "merged")
    assert client.get(f"/api/runs/{third['id']}").json()["status"] == "cancelled"


def test_run_validation(studio):
    client, _, models, _ = studio
    assert client.post("/api/runs", json={"recipe": ""}).status_code == 400
    r = client.post("/api/runs", json={"recipe": task_arithmetic(models).replace(
        "task_arithmetic", "nope")})
    assert r.status_code == 400 and r.json()["line"] == 1
    for path in ("/api/runs/nope", "/api/runs/nope/events"):
        assert client.get(path).status_code == 404
    for path in ("/api/runs/nope/cancel", "/api/runs/nope/resume"):
        assert client.post(path).status_code == 404


# ------------------------------------------------------------------ inspect, eval, trials


def test_inspect(studio):
    client, _, models, outside = studio
    r = client.post("/api/inspect", json={"base": str(models["base"]),
                                          "models": [str(models["ft_a"]), str(models["ft_b"])]})
    assert r.status_code == 200, r.text
    r = r.json()
    assert r["data"]["pairs"] and r["recommendations"] and "cosine" in r["summary"].lower()
    assert r["pngs"] and all(p.endswith(".png") for p in r["pngs"])
    png = client.get("/api/file", params={"path": r["pngs"][0]})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.post("/api/inspect", json={"base": str(models["base"]),
                                             "models": [str(outside)]}).status_code == 403
    assert client.post("/api/inspect", json={"base": str(models["base"])}).status_code == 400


def test_eval_validation(studio):
    client, _, models, outside = studio
    run_id = client.post("/api/runs", json={"recipe": slices(models)}).json()["run"]["id"]
    wait_for(client, run_id, {"done"})
    assert client.post(f"/api/runs/{run_id}/eval", json={}).status_code == 400
    r = client.post(f"/api/runs/{run_id}/eval", json={"text": str(outside / "secret.txt")})
    assert r.status_code == 403
    r = client.post(f"/api/runs/{run_id}/eval", json={"text": "nothing.txt"})
    assert r.status_code == 404
    r = client.post(f"/api/runs/{run_id}/eval", json={"text": "eval.txt",
                                                      "parents": [str(outside)]})
    assert r.status_code == 403
    r = client.post(f"/api/runs/{run_id}/eval", json={
        "text": "eval.txt", "parents": [str(models["ft_a"]), "models/ft_b"]})
    assert r.status_code == 200, r.text
    report = r.json()["report"]
    assert report["model"]["perplexity"] > 1
    assert [p["folder"] for p in report["parents"]] == [str(models["ft_a"]),
                                                        str(models["ft_b"])]
    assert all(p["kl"] >= 0 and 0 <= p["top1"] <= 1 for p in report["parents"])
    assert "perplexity" in r.json()["table"]
    assert os.path.exists(os.path.join(client.get(f"/api/runs/{run_id}").json()["folder"],
                                       "eval.json"))


def test_trials(studio):
    client, config, _, _ = studio
    folder = os.path.join(config.workdir, "search-out", "search")
    os.makedirs(folder)
    with open(os.path.join(folder, "trials.jsonl"), "w") as f:
        for i in range(3):
            f.write(json.dumps({"trial": i, "score": 1.0 / (i + 1), "state": "complete",
                                "params": {"w": i}}) + "\n")
        f.write("not json\n")
    r = client.get("/api/trials", params={"path": "search-out"}).json()
    assert [t["trial"] for t in r["trials"]] == [0, 1, 2]
    assert client.get("/api/trials", params={"path": "models"}).status_code == 404


# ------------------------------------------------------------------ command line


def test_command_line(monkeypatch):
    from click.testing import CliRunner

    from mergesmith.cli import cli

    out = CliRunner().invoke(cli, ["studio", "--help"]).output
    assert "--allow" in out and "--no-browser" in out and "token" in out
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # the extra is missing
    r = CliRunner().invoke(cli, ["studio", "--no-browser"])
    assert r.exit_code == 2 and "pip install 'mergesmith[studio]'" in r.output
    probe = ("import sys; from mergesmith.cli import cli\n"
             "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if 'studio' in m or 'starlette' in m))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip().endswith("[]") and "studio" in done.stdout
