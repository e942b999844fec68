"""``explore --serve``: the live page's server on the tiny experiment, through its HTTP API and in
a real browser; answers compared with direct ``monitor`` and ``steer`` calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import write_experiment

import tlextract.report.live as live_module
from tlextract.config import GenerationSettings, load_experiment
from tlextract.ops.monitor import TokenScores, monitor
from tlextract.ops.steer import steer
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.report.explorer import chosen_layer
from tlextract.report.live import MAX_PROMPT_CHARS, STRENGTH, load_live
from tlextract.report.live_server import LiveServer
from tlextract.settings import settings_for
from tlextract.stages.run import run_trait

TRAITS = ("alpha", "beta")
BUDGET = 12
PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model):
    """alpha and beta run on the tiny model, served on a free loopback port in a thread."""
    root = tmp_path_factory.mktemp("live")
    write_experiment(root)
    exp = load_experiment("tiny", root)
    for trait in TRAITS:
        run_trait(settings_for(exp, trait), get_model=lambda: tiny_model)
    live = load_live(exp, TRAITS, max_new_tokens=BUDGET, get_model=lambda: tiny_model)
    server = LiveServer(live, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, exp, server
    server.shutdown()
    server.server_close()
    thread.join()


def post(server: LiveServer, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + "api/generate", data, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def direct(exp, model, steered: str | None = None, strength: float = 0.0) -> TokenScores:
    """The same answer from the library alone: saved vectors, the explorer's layer, monitor."""
    vectors = {
        t: TraitVectors.load(settings_for(exp, t).stage_dir("vectors") / "mean_diff.pt")
        for t in TRAITS
    }
    layers = {t: chosen_layer(settings_for(exp, t), v)[0] for t, v in vectors.items()}
    settings = GenerationSettings(max_new_tokens=BUDGET, do_sample=False)

    def answer() -> TokenScores:
        return monitor(model, [PROMPT], vectors, layers, style=exp.prompt_style,
                       settings=settings).texts[0]  # fmt: skip

    if steered is None:
        return answer()
    with steer(model, vectors[steered], layers[steered], strength):  # its own residual_norm
        return answer()


def answer_part(text: TokenScores) -> tuple[list[int], dict[str, list[float]]]:
    keep = [i for i, p in enumerate(text.is_prompt) if not p]
    return [text.token_ids[i] for i in keep], {
        t: [s[i] for i in keep] for t, s in text.scores.items()
    }


def test_an_answer_has_the_scores_monitor_gives(served, tiny_model) -> None:
    _, exp, server = served
    status, out = post(server, {"prompt": PROMPT})
    assert status == 200 and out["steered"] is None
    ids, scores = answer_part(direct(exp, tiny_model))
    got = out["unsteered"]
    assert got["token_ids"] == ids and len(ids) > 0
    assert got["scores"] == scores  # the same floats, through JSON
    assert got["text"] == "".join(got["tokens"])


def test_steering_changes_the_answer_as_steer_does(served, tiny_model) -> None:
    _, exp, server = served
    status, out = post(server, {"prompt": PROMPT, "steer": "alpha", "strength": STRENGTH})
    assert status == 200
    assert out["steered"]["text"] != out["unsteered"]["text"]  # the strength is large enough
    ids, scores = answer_part(direct(exp, tiny_model, "alpha", STRENGTH))
    assert out["steered"]["token_ids"] == ids
    assert out["steered"]["scores"] == scores
    assert answer_part(direct(exp, tiny_model))[0] == out["unsteered"]["token_ids"]


def stream(server: LiveServer, body: object) -> tuple[int, object]:
    """``POST /api/stream``: the status and the reply (open, to read event by event) or, for an
    error, its JSON."""
    request = urllib.request.Request(
        server.url + "api/stream", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        return 200, urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


class Gate:
    """Holds the live page's generation after ``after`` streamed tokens until :meth:`release`
    (wrapping the ``on_token`` that :mod:`tlextract.report.live` gives ``monitor``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
        self.after, self.count = after, 0
        self.reached, self.opened = threading.Event(), threading.Event()
        real = live_module.monitor

        def gated(*args, on_token=None, **kwargs):
            def held(*token) -> None:
                on_token(*token)
                self.count += 1
                if self.count == self.after:
                    self.reached.set()
                    assert self.opened.wait(60)

            return real(*args, on_token=held if on_token else None, **kwargs)

        monkeypatch.setattr(live_module, "monitor", gated)

    def release(self) -> None:
        self.opened.set()


def test_a_stream_sends_each_token_before_the_answer_is_done(served, monkeypatch) -> None:
    _, exp, server = served
    _, whole = post(server, {"prompt": PROMPT, "steer": "alpha", "strength": STRENGTH})
    gate = Gate(monkeypatch, after=3)
    status, reply = stream(server, {"prompt": PROMPT, "steer": "alpha", "strength": STRENGTH})
    assert status == 200 and reply.headers["Content-Type"] == "application/x-ndjson"
    first = [json.loads(reply.readline()) for _ in range(4)]
    assert gate.reached.is_set() and not gate.opened.is_set()  # read while generation waits
    gate.release()
    events = first + [json.loads(line) for line in reply]
    reply.close()
    assert [e["event"] for e in events[:4]] == ["start", "token", "token", "token"]
    assert events[-1]["event"] == "done"
    done = {k: v for k, v in events[-1].items() if k != "event"}
    assert done == whole  # the same answers as the whole reply
    for which in ("unsteered", "steered"):
        tokens = [e for e in events if e["event"] == "token" and e["answer"] == which]
        answer = whole[which]
        assert [e["token_id"] for e in tokens] == answer["token_ids"]
        assert [e["token"] for e in tokens] == answer["tokens"]
        for t in TRAITS:
            assert [e["scores"][t] for e in tokens] == answer["scores"][t]
            flags = [e["above"][t] for e in tokens]
            assert flags == (answer["above"][t] or [None] * len(tokens))
    starts = [(i, e["answer"]) for i, e in enumerate(events) if e["event"] == "start"]
    n = len(whole["unsteered"]["tokens"])
    assert starts == [(0, "unsteered"), (n + 1, "steered")]  # in order, one after the other


def test_a_page_that_leaves_mid_stream_stops_the_generation(served, monkeypatch) -> None:
    server = served[2]
    gate = Gate(monkeypatch, after=2)
    _, reply = stream(server, {"prompt": PROMPT})
    assert json.loads(reply.readline())["event"] == "start"
    assert gate.reached.wait(60)
    reply.close()  # the page is closed mid-answer
    gate.release()
    for _ in range(600):  # the server notices at its next writes
        if server.live.lock.acquire(blocking=False):
            server.live.lock.release()
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail("the generation went on after the page left")
    assert gate.count < BUDGET  # stopped early: not every token was generated
    assert post(server, {"prompt": PROMPT})[0] == 200


def test_a_failure_mid_stream_ends_it_with_one_line(served, monkeypatch) -> None:
    real, calls = live_module.Live.token_event, []

    def token_event(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(self, *args)

    monkeypatch.setattr(live_module.Live, "token_event", token_event)
    status, reply = stream(served[2], {"prompt": PROMPT})
    events = [json.loads(line) for line in reply]
    assert status == 200
    assert [e["event"] for e in events] == ["start", "token", "token", "error"]
    assert events[-1]["error"] == "a bug in tlextract: RuntimeError('boom')"
    assert not served[2].live.lock.locked()


def test_bad_input_and_a_busy_model_on_the_stream_get_400_and_409(served) -> None:
    server = served[2]
    assert stream(server, {"prompt": " "}) == (400, {"error": "the prompt is empty: type "
                                                             "something to answer."})  # fmt: skip
    with server.live.lock:
        status, out = stream(server, {"prompt": PROMPT})
    assert status == 409 and "another answer is being generated" in out["error"]


def test_a_second_request_while_one_runs_gets_409(served) -> None:
    _, _, server = served
    with server.live.lock:  # as if an answer were being generated
        status, out = post(server, {"prompt": PROMPT})
    assert status == 409 and "another answer is being generated" in out["error"]
    assert post(server, {"prompt": PROMPT})[0] == 200  # free again


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "   "}, "the prompt is empty"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, f"at most {MAX_PROMPT_CHARS}"),
        ({"prompt": PROMPT, "steer": "gamma", "strength": 1}, "unknown trait 'gamma'"),
        ({"prompt": PROMPT, "steer": "alpha", "strength": STRENGTH + 0.5}, "from -2.0 to 2.0"),
        ({"prompt": PROMPT, "steer": "alpha", "strength": "big"}, "strength 'big'"),
        ({"prompt": PROMPT, "steer": "alpha"}, "strength None"),
        ([PROMPT], "must be a JSON object"),
        (b"{not json", "not JSON"),
    ],
)
def test_bad_input_gets_400_with_one_line(served, body, says) -> None:
    status, out = post(served[2], body)
    assert status == 400
    assert says in out["error"] and "\n" not in out["error"]


def test_a_bug_is_a_500_with_one_line_not_a_dropped_connection(served, monkeypatch) -> None:
    def broken(request: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(served[2].live, "generate", broken)
    assert post(served[2], {"prompt": PROMPT}) == (500, {"error": "a bug in tlextract: "
                                                         "RuntimeError('boom')"})  # fmt: skip


def test_the_page_is_served_and_other_paths_are_not(served) -> None:
    server = served[2]
    with urllib.request.urlopen(server.url, timeout=10) as reply:
        html = reply.read().decode()
    assert '"traits":["alpha","beta"]' in html and "/*COMMON" not in html
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "nothing", timeout=10)
    assert e.value.code == 404


def test_tokens_above_a_saved_alarm_at_the_shown_layer_are_flagged(served) -> None:
    live = served[2].live
    alpha = live.traits["alpha"]
    alarm = {"layer": alpha.layer, "threshold": 0.32, "figures": {"formulation": {"window": 2}}}
    watched = replace(live, traits={**live.traits, "alpha": replace(alpha, alarm=alarm)})
    # running means over 2 tokens: 0.1, 0.3, 0.15, 0.35 (raw, 0.5 would be above too)
    assert watched.above("alpha", [0.1, 0.5, -0.2, 0.9]) == [False, False, False, True]
    elsewhere = replace(alpha, alarm={**alarm, "layer": alpha.layer + 1})
    assert replace(live, traits={"alpha": elsewhere}).above("alpha", [0.9]) is None
    assert live.above("beta", [0.9]) is None  # no alarm saved


def answered(page) -> None:
    """Wait for the answer the page asked for (the click set its state to generating)."""
    page.tab.locator("body[data-state=idle]").wait_for()


@pytest.mark.browser
def test_the_page_colours_steers_and_says_what_is_wrong(served, page, screenshots) -> None:
    server = served[2]
    _, api = post(server, {"prompt": PROMPT, "steer": "alpha", "strength": STRENGTH})
    page.open(server.url)
    page.tab.fill("#prompt", PROMPT)
    page.tab.click("#generate")
    answered(page)
    spans = page.tab.locator("#unsteered .tok")
    want = api["unsteered"]
    assert spans.count() == len(want["tokens"])
    for i in range(spans.count()):
        assert float(spans.nth(i).get_attribute("data-score")) == want["scores"]["alpha"][i]
    shown = page.hover(spans.nth(1), shows="#tip")
    assert f"alpha {want['scores']['alpha'][1]:.4f}" in shown
    assert f"beta {want['scores']['beta'][1]:.4f}" in shown
    assert page.tab.locator("#steered").is_hidden()

    page.tab.check("#steer-on")
    page.tab.select_option("#steer-trait", "alpha")
    page.tab.fill("#strength", str(STRENGTH))
    page.tab.click("#generate")
    answered(page)
    unsteered = page.tab.locator("#unsteered").get_attribute("data-text")
    steered = page.tab.locator("#steered").get_attribute("data-text")
    assert unsteered == want["text"] and steered == api["steered"]["text"] != unsteered
    page.assert_rendered("#unsteered .tokens", "#steered .tokens", "#legend")
    page.screenshot(screenshots / "live.png")

    page.tab.fill("#prompt", "")
    page.tab.click("#generate")
    page.tab.locator("#message").wait_for(state="visible")
    assert "the prompt is empty" in page.tab.locator("#message").inner_text()
    # Chromium logs every 4xx reply to the console; this one is the test's, and the only error.
    assert page.errors == [
        "console.error: Failed to load resource: the server responded with a status of 400 "
        "(Bad Request)"
    ]
    page.errors.clear()


@pytest.mark.browser
def test_the_page_shows_tokens_as_they_stream(served, page, monkeypatch) -> None:
    server = served[2]
    _, whole = post(server, {"prompt": PROMPT})
    want = whole["unsteered"]
    gate = Gate(monkeypatch, after=3)
    page.open(server.url)
    page.tab.fill("#prompt", PROMPT)
    page.tab.click("#generate")
    spans = page.tab.locator("#unsteered .tok")
    try:
        assert gate.reached.wait(60)
        spans.nth(2).wait_for()
        # Three tokens drawn, coloured and scored, while the model waits for the fourth.
        assert spans.count() == 3 and page.tab.locator("body").get_attribute("data-state") == (
            "generating"
        )
        assert page.tab.locator("#generate").is_disabled()
        for i in range(3):
            assert float(spans.nth(i).get_attribute("data-score")) == want["scores"]["alpha"][i]
        assert f"beta {want['scores']['beta'][1]:.4f}" in page.hover(spans.nth(1), shows="#tip")
    finally:
        gate.release()
    answered(page)
    assert spans.count() == len(want["tokens"])
    assert page.tab.locator("#unsteered").get_attribute("data-text") == want["text"]
    page.assert_rendered("#unsteered .tokens", "#legend")


@pytest.mark.slow
def test_the_command_serves_on_a_free_port_and_stops_on_ctrl_c(served) -> None:
    root = served[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "tlextract", "explore", "--serve", "--port", "0",
               "--experiment", "tiny", "--experiments-dir", str(root)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = next(x for x in proc.stdout if x.startswith("live page: http"))
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert rest.strip().splitlines() == ["live page: stopped"]
