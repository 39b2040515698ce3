"""The labelling server's JSON API with a fake generator (no model): records the reward reader
accepts, every refusal a 4xx that writes nothing, leases, undo, restart, the token."""

import json
import threading

import pytest

pytest.importorskip(
    "starlette", reason="the label extra (starlette, uvicorn, httpx) is not installed"
)
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
from starlette.testclient import TestClient  # noqa: E402

from palm_rlhf.data.records import read_comparisons, read_ratings  # noqa: E402
from palm_rlhf.label.app import create_app  # noqa: E402
from palm_rlhf.label.session import wilson_interval  # noqa: E402
from palm_rlhf.label.stage import choose_token  # noqa: E402
from palm_rlhf.label.store import LabelFileError, ties_path  # noqa: E402
from tests.label_helpers import PROMPTS, make_session  # noqa: E402

BASE = "http://127.0.0.1:8000"


def serve(tmp_path, token=None, **options):
    session, config = make_session(tmp_path, **options)
    app = create_app(session, config.settings(), token=token)
    return TestClient(app, base_url=BASE), session, config


def post(client, path, body=None, who="tab1", **kwargs):
    return client.post(path, json={"client": who, **(body or {})}, **kwargs)


def next_id(client, who="tab1") -> str:
    answer = post(client, "/api/next", who=who).json()
    assert answer["item"] is not None, answer
    return answer["item"]["id"]


def lines(config) -> list:
    path = config.out if isinstance(config.out, str) else config.out
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_rank_labels_are_the_records_palm_rlhf_reward_reads(tmp_path):
    client, session, config = serve(tmp_path, responses=3)
    rankings = [[2, 0, 1], [0, 1, 2], [1, 2, 0], [0, 2, 1]]
    for ranking in rankings:
        item = post(client, "/api/next").json()["item"]
        assert len(item["responses"]) == 3 and item["prompt"] in PROMPTS
        assert post(client, "/api/submit", {"id": item["id"], "ranking": ranking}).json()["ok"]
    assert post(client, "/api/next").json() == {
        "item": None,
        "done": True,
        "progress": {"labelled": 4, "total": 4, "skipped": 0, "failed": 0, "leased": 0},
    }
    records = read_comparisons(config.out)
    assert [r.ranking for r in records] == rankings
    assert [r.prompt for r in records] == PROMPTS
    assert all(
        set(line) == {"prompt", "responses", "ranking", "id", "mode"} for line in lines(config)
    )


def test_rate_mode_writes_ratings_on_the_scale(tmp_path):
    client, session, config = serve(tmp_path, mode="rate", scale=7, prompts=PROMPTS[:2])
    for rating in (7, 1):
        item_id = next_id(client)
        assert post(client, "/api/submit", {"id": item_id, "rating": rating}).status_code == 200
    assert [r.rating for r in read_ratings(config.out, num_bins=7)] == [7, 1]


def test_arena_hides_the_order_writes_comparisons_and_keeps_ties_apart(tmp_path):
    prompts = [f"prompt {i}" for i in range(6)]
    client, session, config = serve(tmp_path, mode="arena", prompts=prompts)
    choices = ["left", "right", "tie", "left", "left", "right"]
    shown = []
    for choice in choices:
        item = post(client, "/api/next").json()["item"]
        shown.append(item["responses"][0].startswith("B says"))
        post(client, "/api/submit", {"id": item["id"], "choice": choice})
    assert 0 < sum(shown) < len(shown)  # checkpoint B is sometimes left, sometimes right
    records = read_comparisons(config.out)
    assert len(records) == 5  # the tie is no comparison record
    ties = [
        json.loads(line) for line in ties_path(tmp_path / "labels.jsonl").read_text().splitlines()
    ]
    assert len(ties) == 1 and ties[0]["winner"] == "tie" and ties[0]["b"].startswith("B says")
    winners = [line["winner"] for line in lines(config)]
    for line in lines(config):  # "winner" names the checkpoint whose text was chosen
        assert line["chosen"].startswith("B says") == (line["winner"] == "b")
    arena = client.get("/api/stats").json()["arena"]
    b_wins = winners.count("b")
    assert arena["a"] + arena["b"] == 5 and arena["ties"] == 1 and arena["b"] == b_wins
    assert arena["b_win_rate_95"] == pytest.approx(list(wilson_interval(b_wins, 5)))


def test_wilson_interval_against_hand_computed_values():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71675,
    # half-width 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94333), abs=1e-4)
    assert wilson_interval(0, 4) == pytest.approx((0.0, 0.48990), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


BAD_SUBMISSIONS = [
    ({"id": "0000000000000000", "ranking": [0, 1, 2]}, 404, "unknown item id"),
    ({"ranking": [0, 1, 2]}, 400, 'missing key "id"'),
    ({"id": 7, "ranking": [0, 1, 2]}, 400, '"id" must be a string'),
    ({"id": None, "ranking": [0, 0, 1]}, 422, "not a permutation"),
    ({"id": None, "ranking": [0, 1, 3]}, 422, "not a permutation"),
    ({"id": None, "ranking": [0, 1]}, 422, "not a permutation"),
    ({"id": None, "ranking": "0,1,2"}, 400, '"ranking" must be an array'),
    ({"id": None, "ranking": [0, 1, True]}, 400, '"ranking"[2] must be an integer'),
    ({"id": None, "ranking": [0, 1, 2.0]}, 400, '"ranking"[2] must be an integer'),
    ({"id": None}, 400, 'missing key "ranking"'),
    ({"id": None, "ranking": [2, 1, 0], "client": "no spaces please"}, 400, '"client" must be'),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_SUBMISSIONS)
def test_a_bad_rank_label_is_a_4xx_naming_the_problem_and_writes_nothing(
    tmp_path, body, status, message
):
    client, session, config = serve(tmp_path, responses=3)
    item_id = next_id(client)
    body = {
        "client": "tab1",
        **{k: (item_id if k == "id" and v is None else v) for k, v in body.items()},
    }
    response = client.post("/api/submit", json=body)
    assert response.status_code == status and message in response.json()["error"]
    assert not (tmp_path / "labels.jsonl").exists()
    # the lease survives a refused label: the right label is still accepted
    good = client.post("/api/submit", json={"client": "tab1", "id": item_id, "ranking": [2, 1, 0]})
    assert good.status_code == 200


@pytest.mark.parametrize(
    ("label", "status", "message"),
    [
        ({"rating": 0}, 422, "outside the scale 1..5"),
        ({"rating": 6}, 422, "outside the scale"),
        ({"rating": 3.5}, 400, "must be an integer"),
        ({"rating": "4"}, 400, "must be an integer"),
    ],
)
def test_a_rating_outside_the_scale_or_of_the_wrong_type_is_refused(
    tmp_path, label, status, message
):
    client, session, config = serve(tmp_path, mode="rate")
    response = post(client, "/api/submit", {"id": next_id(client), **label})
    assert response.status_code == status and message in response.json()["error"]
    assert not (tmp_path / "labels.jsonl").exists()


def test_malformed_requests_get_json_errors(tmp_path):
    client, session, config = serve(tmp_path)
    item_id = next_id(client)
    cases = [
        (
            client.post(
                "/api/submit", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
            "not valid JSON",
        ),
        (client.post("/api/submit", json=[1, 2]), 400, "must be a JSON object"),
        (
            client.post(
                "/api/submit",
                content=b"client=x",
                headers={"content-type": "application/x-www-form-urlencoded"},
            ),
            415,
            "application/json",
        ),
        (
            client.post("/api/submit", content=b"{}", headers={"content-type": "text/plain"}),
            415,
            "application/json",
        ),
        (
            client.post("/api/submit", json={"client": "tab1", "id": item_id, "pad": "x" * 70_000}),
            413,
            "body over",
        ),
        (
            post(client, "/api/submit", {"id": item_id, "choice": "left"}),
            400,
            'missing key "ranking"',
        ),
        (post(client, "/api/skip", {"id": "nope"}), 404, "unknown item id"),
        (post(client, "/api/undo"), 409, "nothing to undo"),
        (client.get("/api/nothing-here"), 404, "Not Found"),
        (client.get("/api/submit"), 405, "Method Not Allowed"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert message in response.json()["error"]
    chunked = client.post(
        "/api/submit",
        content=iter([b"{" + b" " * 40_000, b" " * 40_000 + b"}"]),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413  # no Content-Length: refused while reading
    assert not (tmp_path / "labels.jsonl").exists()


def test_leases_keep_two_tabs_apart_and_expire(tmp_path):
    now = [0.0]
    client, session, config = serve(tmp_path, lease_seconds=60, clock=lambda: now[0])
    first = next_id(client, "tab1")
    assert next_id(client, "tab1") == first  # a reload gets the same item back
    second = next_id(client, "tab2")
    assert second != first
    refused = post(client, "/api/submit", {"id": first, "ranking": [0, 1, 2, 3]}, who="tab2")
    assert refused.status_code == 409 and "leased to another tab" in refused.json()["error"]
    now[0] = 61.0  # tab1 walked away: its item goes to the next tab that asks
    assert next_id(client, "tab2") == second  # tab2 still holds its own (renewed) lease
    assert next_id(client, "tab3") == first
    late = post(client, "/api/submit", {"id": first, "ranking": [0, 1, 2, 3]}, who="tab1")
    assert late.status_code == 409


def test_concurrent_tabs_never_share_an_item_and_every_label_lands(tmp_path):
    prompts = [f"prompt number {i}" for i in range(12)]
    client, session, config = serve(tmp_path, prompts=prompts, responses=2, ahead=2)
    seen, errors, barrier = [], [], threading.Barrier(4)

    def tab(name):
        barrier.wait()
        while True:
            answer = post(client, "/api/next", who=name).json()
            if answer["item"] is None:
                if answer["done"]:
                    return
                continue
            seen.append(answer["item"]["id"])
            response = post(
                client, "/api/submit", {"id": answer["item"]["id"], "ranking": [1, 0]}, who=name
            )
            if response.status_code != 200:
                errors.append(response.text)

    threads = [threading.Thread(target=tab, args=(f"tab{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(seen) == 12 and len(set(seen)) == 12
    assert sorted(r["id"] for r in lines(config)) == sorted(seen)


def test_undo_removes_this_tabs_last_label_and_offers_the_item_again(tmp_path):
    client, session, config = serve(tmp_path, responses=2)
    ids = []
    for _ in range(2):
        ids.append(next_id(client))
        post(client, "/api/submit", {"id": ids[-1], "ranking": [0, 1]})
    other = next_id(client, "tab2")
    post(client, "/api/submit", {"id": other, "ranking": [1, 0]}, who="tab2")
    on_screen = next_id(client)
    undone = post(client, "/api/undo").json()
    assert undone["undone"] == ids[1] and undone["item"]["id"] == ids[1]
    assert [r["id"] for r in lines(config)] == [ids[0], other]  # tab2's label is untouched
    assert next_id(client) == ids[1]  # the undone item is this tab's again
    assert next_id(client, "tab3") == on_screen  # the one it had on screen went back in line
    post(client, "/api/submit", {"id": ids[1], "ranking": [1, 0]})
    assert [r["ranking"] for r in lines(config)] == [[0, 1], [1, 0], [1, 0]]
    assert post(client, "/api/undo").json()["undone"] == ids[1]
    assert post(client, "/api/undo").json()["undone"] == ids[0]
    assert post(client, "/api/undo").status_code == 409
    assert [r["id"] for r in lines(config)] == [other]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic rewrite leaves no temporary file


def test_a_restart_continues_the_file_and_skips_are_offered_again(tmp_path):
    client, session, config = serve(tmp_path, responses=2)
    labelled = [next_id(client)]
    post(client, "/api/submit", {"id": labelled[0], "ranking": [0, 1]})
    skipped = next_id(client)
    post(client, "/api/skip", {"id": skipped})
    third = next_id(client)
    assert third not in (skipped, *labelled)  # a skipped item is not shown again this run
    post(client, "/api/submit", {"id": third, "ranking": [1, 0]})
    session.prefetcher.stop()

    client, session, config = serve(tmp_path, responses=2)  # same prompts, seed and --out
    assert session.progress()["labelled"] == 2
    remaining = []
    while (answer := post(client, "/api/next").json())["item"] is not None:
        remaining.append(answer["item"]["id"])
        post(client, "/api/submit", {"id": remaining[-1], "ranking": [0, 1]})
    assert skipped in remaining and not set(remaining) & {labelled[0], third}
    assert len(remaining) == 2 and len(read_comparisons(config.out)) == 4
    assert make_session(tmp_path / "x", seed=1)[0].spec_ids.isdisjoint(session.spec_ids)


def test_a_torn_last_line_is_dropped_and_a_foreign_file_refused(tmp_path):
    client, session, config = serve(tmp_path, responses=2)
    item_id = next_id(client)
    post(client, "/api/submit", {"id": item_id, "ranking": [0, 1]})
    session.prefetcher.stop()
    out = tmp_path / "labels.jsonl"
    out.write_bytes(out.read_bytes() + b'{"prompt": "cut sh')  # a crash mid-write
    session, _ = make_session(tmp_path, responses=2)
    assert session.progress()["labelled"] == 1 and out.read_bytes().endswith(b"}\n")
    with pytest.raises(LabelFileError, match="holds rank labels"):
        make_session(tmp_path, mode="rate")
    (tmp_path / "notes.jsonl").write_text("hello\n")
    with pytest.raises(LabelFileError, match=r"notes\.jsonl:1: not a JSON line"):
        make_session(tmp_path, out=str(tmp_path / "notes.jsonl"))


def test_the_token_guards_page_assets_and_api(tmp_path):
    token = "s3cret-token-value"
    client, session, config = serve(tmp_path, token=token)
    assert client.get("/").status_code == 401
    assert client.get("/static/app.js").status_code == 401
    assert client.get("/api/stats").status_code == 401
    assert client.get("/api/stats", headers={"authorization": "Bearer nope"}).status_code == 403
    assert post(client, "/api/next", headers={"x-label-token": "wrong"}).status_code == 403
    assert client.get("/api/stats", headers={"authorization": f"Bearer {token}"}).status_code == 200
    page = client.get(f"/?token={token}")  # the printed URL: sets the cookie the page then uses
    assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
    assert "SameSite=Strict" in page.headers["set-cookie"]
    assert client.get("/static/app.js").status_code == 200  # the cookie carries the token
    assert post(client, "/api/next").json()["item"] is not None
    assert choose_token(None, loopback=True) is None
    assert (
        len(choose_token(None, loopback=False)) >= 32
        and choose_token("given-token", False) == "given-token"
    )


def test_cross_site_posts_and_foreign_host_names_are_refused(tmp_path):
    client, session, config = serve(tmp_path)
    forged = post(client, "/api/next", headers={"origin": "https://evil.example"})
    assert forged.status_code == 403 and "cross-origin" in forged.json()["error"]
    same = post(client, "/api/next", headers={"origin": BASE})
    assert same.status_code == 200
    rebound = client.get("/api/stats", headers={"host": "evil.example:8000"})
    assert rebound.status_code == 403 and "loopback names only" in rebound.json()["error"]
    page = client.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
