"""bench/run works: a smoke run against upasmail, and the verifier's counting."""

import json
import os
import subprocess
import sys

from bench import loadgen, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stored(bench_id, sum_=None, body=None):
    data, real_sum = loadgen.message_of(bench_id, "a@b.net", "c@d.net", 300)
    if body is not None:
        head, _, _ = data.partition(b"\r\n\r\n")
        data = head + b"\r\n\r\n" + body
    return data, real_sum


def test_verifier_counts_missing_duplicated_and_damaged():
    msgs = {i: stored(i) for i in ("a", "b", "c", "d")}
    expected = {i: s for i, (_, s) in msgs.items()}
    damaged, _ = stored("d", body=b"something else\r\n")
    extra, _ = stored("never-acked")
    # a is stored once, b twice, c not at all, d with another body
    v = verify.verify(expected, [msgs["a"][0], msgs["b"][0], msgs["b"][0], damaged, extra])
    assert (v.found, v.missing, v.duplicated, v.damaged, v.unacknowledged) == (2, 1, 1, 1, 1)
    assert v.errors == 3
    assert str(v) == "2/4 (1 missing, 1 duplicated, 1 damaged)"


def test_verifier_all_present_is_no_error():
    msgs = [stored(i) for i in ("a", "b")]
    v = verify.verify({i: s for i, (_, s) in zip("ab", msgs)}, [m for m, _ in msgs])
    assert (v.found, v.errors) == (2, 0)


def test_verifier_reads_mbox_with_lf_and_trailing_blank_line(tmp_path):
    data, sum_ = stored("x")
    box = tmp_path / "mbox"
    box.write_bytes(b"From a Sun Nov 29 21:00:00 2026\n" + data.replace(b"\r\n", b"\n") + b"\n")
    v = verify.verify({"x": sum_}, verify.mbox_messages([str(box)]))
    assert (v.found, v.errors) == (1, 0)
    assert verify.count_mbox([str(box)]) == 1


def test_count_only_verdict():
    assert verify.verify_count(10, 7).errors == 3
    assert verify.verify_count(10, 11).errors == 1
    assert verify.verify_count(10, 10).errors == 0


def test_quick_run_against_upasmail(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run"), "--quick",
                        "--reps", "1", "--servers", "upasmail", "--scenarios", "c10",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    [result] = json.loads(out.read_text())["results"]
    assert (result["server"], result["scenario"]) == ("upasmail", "c10")
    assert result["errors"] == 0 and result["verified_ok"]
    assert result["found"] == result["expected"] == result["acked"] > 0
    assert "upasmail" in r.stdout and "msgs/s" in r.stdout
