"""The benchmark harness's pure parts (medians, pair-by-pair ratios, records, comparison, CI verdicts), its
launcher's measurements, the memory-lean checkpoint path it generates workloads with, and its distributed
checkpoint workload (against torch's own DCP reader and the legacy TP rank files). Runs in seconds."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks import cgroup, harness
from benchmarks.__main__ import (
    byte_size,
    ci_failures,
    dtype_list,
    memory_limit,
    part_balance,
    parts_report,
    scaling_verdict,
)
from benchmarks.launcher import measure
from benchmarks.parallel import split_for_parallel
from benchmarks.workloads import (
    PROFILES,
    STACKED,
    TINY,
    Profile,
    checkpoint_bytes,
    ensure_checkpoint,
    ensure_distributed,
    largest_rearranged,
    mcore_name,
    mcore_shards,
    weight_bytes,
)
from streamconv.converter import convert
from streamconv.demo import SyntheticModel, make_checkpoint, random_gpt2_state_dict, to_nemo_state_dict


def run(wall, rss=100, anon=50):
    return {"wall": wall, "throughput": 10 / wall, "peak_rss": rss, "peak_anon": anon, "timeline": [(0.0, rss, anon)]}


def record(started, walls, profile="medium", layers=2, rss=100):
    meta = {"started": started, "profile": profile, "layers": layers, "optimizer": False, "page_cache": "cold",
            "git": {"commit": "abc"}}
    return harness.make_record(meta, {name: [run(w, rss) for w in ws] for name, ws in walls.items()})


def test_ratios_are_medians_of_per_round_ratios_not_ratios_of_medians():
    runs = {"copy": [run(1.0), run(4.0), run(2.0)], "naive": [run(10.0)] * 3,
            "streamconv": [run(3.0), run(4.0), run(8.0)]}
    r = harness.ratios(runs)
    assert set(r) == {"streamconv/copy", "streamconv/naive"}
    assert r["streamconv/copy"]["per_round"] == [3.0, 1.0, 4.0]
    assert r["streamconv/copy"]["wall"] == 3.0  # the ratio of medians would be 4.0 / 2.0 = 2.0
    assert r["streamconv/naive"]["wall"] == pytest.approx(0.4)
    with pytest.raises(ValueError):  # rounds must pair up
        harness.pair_ratios(runs["copy"][:2], runs["streamconv"])


def test_ratios_pair_a_contender_with_the_baseline_on_the_same_input():
    runs = {"copy": [run(1.0)], "streamconv": [run(2.0)], "copy-dist": [run(2.0)], "streamconv-dist": [run(3.0)],
            "streamconv-tp2": [run(4.0)]}
    r = harness.ratios(runs)
    assert set(r) == {"streamconv/copy", "streamconv-dist/copy", "streamconv-dist/copy-dist", "streamconv-tp2/copy"}
    assert r["streamconv-dist/copy-dist"]["wall"] == 1.5


def test_casts_are_streamconv_contenders_measured_against_the_plain_conversion():
    made = harness.contenders(2048, ["cpu"], ["copy", "streamconv"], ["fp16", "fp32"])
    assert [c.name for c in made] == ["copy", "streamconv", "streamconv-as-fp16", "streamconv-as-fp32"]
    argv = made[2].argv("in.ckpt", "out")
    assert argv[argv.index("--dtype") + 1] == "fp16" and argv[argv.index("--device") + 1] == "cpu"
    assert [c.name for c in harness.contenders(2048, ["cpu"], ["copy"], ["bf16"])] == ["copy", "streamconv-as-bf16"]
    assert harness.plain_of("streamconv-as-fp16") == "streamconv" and harness.plain_of("streamconv") is None
    assert harness.plain_of("streamconv-as-bf16-dist") == "streamconv-dist"
    assert harness.plain_of("streamconv-parts3") == "streamconv" and harness.plain_of("streamconv-cuda") is None

    runs = {"copy": [run(1.0)], "dd": [run(0.5)], "streamconv": [run(2.0, rss=100)],
            "streamconv-as-fp16": [run(2.2, rss=105)]}
    r = harness.ratios(runs)
    assert set(r) == {"streamconv/copy", "streamconv/dd", "streamconv-as-fp16/copy", "streamconv-as-fp16/dd",
                      "streamconv-as-fp16/streamconv"}
    assert r["streamconv/dd"]["wall"] == 4.0
    assert r["streamconv-as-fp16/streamconv"]["wall"] == pytest.approx(1.1)
    assert r["streamconv-as-fp16/streamconv"]["peak_rss"] == pytest.approx(1.05)


def test_targets_are_reported_for_the_source_dtype_they_track():
    found = {"streamconv-as-fp16/streamconv": {"wall": 1.2, "peak_rss": 1.05},
             "streamconv-as-bf16/copy": {"wall": 1.1, "peak_rss": 2.0}}
    bf16 = harness.targets("bf16", found)
    assert [(t["figure"], t["value"], t["ceiling"], t["met"]) for t in bf16] == [
        ("wall", 1.2, 1.15, False), ("peak_rss", 1.05, 1.10, True)]
    assert [(t["ratio"], t["met"]) for t in harness.targets("fp32", found)] == [("streamconv-as-bf16/copy", True)]
    assert harness.targets("fp32", {}) == []
    text = harness.table(harness.make_record({"source_dtype": "bf16"}, {
        "streamconv": [run(2.0)], "streamconv-as-fp16": [run(2.4)]}))
    assert "| streamconv-as-fp16/streamconv | wall | 1.200 | 1.150 | NO |" in text


def test_dtype_list():
    assert dtype_list("fp16, fp32,fp16") == ["fp16", "fp32"]
    for bad in ("", "fp8", "fp16,int8"):
        with pytest.raises(argparse.ArgumentTypeError):
            dtype_list(bad)


def test_dd_copies_a_file_or_a_folder_into_the_same_layout(tmp_path):
    src = tmp_path / "ckpt.dist"
    (src / "sub").mkdir(parents=True)
    for name, size in (("__0_0.distcp", 3 * 2**20 + 17), (".metadata", 100), ("sub/common.pt", 4096)):
        (src / name).write_bytes(os.urandom(size))
    dd = harness.contenders(2048, ["cpu"], ["dd"])[0]
    assert harness.dd_refusal(src, tmp_path / "scratch") is None
    assert not (tmp_path / "scratch" / "dd-probe").exists()
    subprocess.run(dd.argv(src, tmp_path / "out"), check=True)
    assert harness.digests(tmp_path / "out") == harness.digests(src)
    subprocess.run(dd.argv(src / "__0_0.distcp", tmp_path / "one"), check=True)
    assert (tmp_path / "one").read_bytes() == (src / "__0_0.distcp").read_bytes()


def test_dd_refusal_says_why(tmp_path, monkeypatch):
    """A file system refusing O_DIRECT (a fake dd here, as tmpfs before Linux 6.6 answers) is reported."""
    fake = tmp_path / "bin" / "dd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"dd: failed to open '$1': Invalid argument\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "x.ckpt").write_bytes(b"x" * 8192)
    why = harness.dd_refusal(tmp_path / "x.ckpt", tmp_path / "scratch")
    assert why.startswith("dd with O_DIRECT fails from") and "Invalid argument" in why


def killed(wall=1.5, rss=900):
    return {**run(wall, rss), "status": "OOM-killed", "returncode": -9, "oom_killed": True, "cgroup_peak": 1000}


def test_runs_that_did_not_convert_are_shown_but_left_out_of_medians_and_ratios():
    assert harness.status(0, 0) == "converted" and harness.status(-9, 1) == "OOM-killed"
    assert harness.status(1, 0) == "failed (exit 1)"
    runs = {"copy": [run(1.0), run(2.0), run(1.0)], "naive": [killed()] * 3,
            "streamconv": [run(2.0), killed(), run(4.0)]}
    s = {k: harness.summarize(v) for k, v in runs.items()}
    assert s["naive"] == {"status": "OOM-killed", "runs": 3, "converted": 0, "cgroup_peak_max": 1000}
    assert s["streamconv"]["status"] == "2/3 converted, 1/3 OOM-killed"
    assert s["streamconv"]["wall"] == 3.0 and s["streamconv"]["peak_rss"] == 100  # the killed run's 900 left out
    r = harness.ratios(runs)
    assert set(r) == {"streamconv/copy"}  # naive never converted: no ratio against it
    assert r["streamconv/copy"]["per_round"] == [2.0, 4.0]  # round 2 left out

    rec = harness.make_record({"memory_limit": {"bytes": 1.5e9, "applied": True, "note": "cgroup v1"}}, runs)
    text = harness.table(rec)
    assert text.startswith("memory limit 1.500 GB per run, page cache included (cgroup v1)")
    assert "| naive | — | — | — | — | — | 0.000 | OOM-killed |" in text
    assert "| streamconv | 3.00 | 2.00–4.00 |" in text and "| 2/3 converted, 1/3 OOM-killed |" in text
    assert "  naive: converted -> OOM-killed" in harness.compare(record("t", {"naive": [1.0]}), rec)
    unapplied = {"bytes": 1.5e9, "applied": False, "note": "no memory cgroup hierarchy is mounted"}
    assert "NOT applied (no memory cgroup hierarchy is mounted)" in harness.limit_line(unapplied)
    assert harness.workload(rec) != harness.workload({**rec, "memory_limit": unapplied})


V1_CGROUP = "5:devices:/\n4:memory:/process_api/18ca\n1:cpu:/\n0::/\n"
V1_MOUNTS = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
             "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
             "36 31 0:33 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n")


def test_locate_finds_the_memory_cgroup_of_v1_v2_and_hybrid_machines():
    assert cgroup.locate(V1_CGROUP, V1_MOUNTS) == (1, Path("/sys/fs/cgroup/memory/process_api/18ca"))
    v2_mounts = "30 23 0:27 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    assert cgroup.locate("0::/user.slice/session-1.scope\n", v2_mounts) == (
        2, Path("/sys/fs/cgroup/user.slice/session-1.scope"))
    assert cgroup.locate(V1_CGROUP, V1_MOUNTS + v2_mounts)[0] == 1  # hybrid: memory is v1's
    assert cgroup.locate("0::/\n", v2_mounts) == (2, Path("/sys/fs/cgroup"))
    container = "40 30 0:33 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
    assert cgroup.locate("4:memory:/docker/abc/job\n", container) == (1, Path("/sys/fs/cgroup/memory/job"))
    assert cgroup.locate(V1_CGROUP, V1_MOUNTS.splitlines()[1]) is None  # no memory hierarchy mounted


def test_counters_read_oom_control_and_memory_events():
    assert cgroup.counters("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")["oom_kill"] == 2
    assert cgroup.counters("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")["oom_kill"] == 1


def test_without_a_writable_cgroup_the_limit_is_reported_and_not_applied(monkeypatch, capsys):
    monkeypatch.setattr(cgroup, "locate", lambda *_: None)
    limit, recorded = memory_limit(byte_size("1500MB"))
    assert limit is None and recorded == {"bytes": 1_500_000_000, "applied": False,
                                          "note": "no memory cgroup hierarchy is mounted"}
    assert capsys.readouterr().out == ("--memory-limit 1.500 GB NOT applied, runs are unlimited: "
                                       "no memory cgroup hierarchy is mounted\n")
    assert memory_limit(None) == (None, None)
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size("lots")


def _limit(nbytes):
    limit, note = cgroup.prepare(nbytes)
    if limit is None:
        pytest.skip(f"no writable memory cgroup: {note}")
    return limit


def _children(limit):
    return sorted(p.name for p in limit.parent.iterdir() if p.name.startswith(f"streamconv-bench-{os.getpid()}-"))


def test_a_run_over_the_limit_is_recorded_as_oom_killed_not_fatal(tmp_path):
    limit = _limit(100 * 2**20)
    hog = harness.Contender("hog", lambda src, dst: [sys.executable, "-c", "b = bytearray(400 * 2**20)"])
    r = harness.run_once(hog, tmp_path, tmp_path / "scratch", 1, cold=False, limit=limit)
    assert (r["status"], r["oom_killed"], r["returncode"]) == ("OOM-killed", True, -9)
    assert r["oom_kills"] >= 1 and 90 * 2**20 < r["cgroup_peak"] <= 100 * 2**20
    assert _children(limit) == []  # each run's cgroup is removed


def test_tiny_conversion_under_a_memory_limit(tmp_path):
    """A real conversion of the tiny checkpoint in its cgroup: converted, the cgroup saw its memory."""
    limit = _limit(2**30)
    src = ensure_checkpoint(TINY, tmp_path)
    streamconv = harness.contenders(TINY.vocab_size, ["cpu"], ["streamconv"])[0]
    r = harness.run_once(streamconv, src, tmp_path / "scratch", 1, cold=False, digest=True, limit=limit)
    assert (r["status"], r["oom_killed"], r["returncode"], r["oom_kills"]) == ("converted", False, 0, 0)
    assert "model.safetensors" in r["outputs"]
    assert 10 * 2**20 < r["cgroup_peak"] < 2**30 and r["peak_rss"] < 2**30
    assert _children(limit) == [] and not (tmp_path / "scratch" / "streamconv").exists()


def test_parts_contender_runs_every_part_at_once_into_the_single_runs_folder(tmp_path):
    """`--parts 3`: three real part processes under one shell give the single run's folder, byte for byte; the
    staged folder they leave is cleared with the output, so the next round converts again; one failing part
    fails the run; the balance is read off the plan as --part cuts it."""
    src = ensure_checkpoint(TINY, tmp_path)
    scratch = tmp_path / "scratch"
    single = harness.contenders(TINY.vocab_size, ["cpu"], ["streamconv"])[0]
    split = harness.parts_contender(TINY.vocab_size, 3)
    assert split.name == "streamconv-parts3" and harness.plain_of(split.name) == "streamconv"
    runs = harness.run_rounds([("streamconv", single, src, 1), (split.name, split, src, 1)], scratch, 2, cold=False,
                              digest={"streamconv", split.name})
    assert harness.output_differences(runs, "streamconv", split.name) == []
    assert "model.safetensors" in runs[split.name][0]["outputs"] and sorted(os.listdir(scratch)) == []
    assert {r["status"] for r in runs[split.name]} == {"converted"}

    broken = harness.Contender("broken", lambda s, d: ["sh", "-c", harness.PARTS, "sh", "3", sys.executable, "-c",
                                                       "import sys; sys.exit(sys.argv[-1] == '1/3')"])
    with pytest.raises(SystemExit, match="broken failed"):
        harness.run_once(broken, src, scratch, 1, cold=False)

    balance = part_balance(src, TINY.vocab_size, 3)
    convert(src, tmp_path / "out", vocab_size=TINY.vocab_size)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert sum(balance["bytes"]) == sum(f.get_tensor(k).nbytes for k in names)
        assert sum(balance["tensors"]) == len(names)
    assert max(balance["bytes"]) - min(balance["bytes"]) <= balance["largest_tensor_bytes"]
    lines = parts_report({"parts": {"count": 3, **balance, "identical": True, "differences": []}})
    assert lines[0].startswith("streamconv-parts3: 3 parts at once") and "byte-identical" in lines[1]


def test_split_conversions_are_tracked_against_the_single_run():
    runs = {"streamconv": [run(2.0, rss=100)], "streamconv-parts3": [run(2.1, rss=90)]}
    found = harness.ratios(runs)
    assert found["streamconv-parts3/streamconv"]["wall"] == pytest.approx(1.05)
    assert [(t["figure"], t["ceiling"], t["met"]) for t in harness.targets("fp32", found)] == [
        ("wall", 1.10, True), ("peak_rss", 1.01, True)]


def test_output_differences_name_each_file_and_round():
    same = {"config.json": "a", "model.safetensors": "b"}
    runs = {"streamconv": [{**run(1.0), "outputs": same}] * 2,
            "streamconv-dist": [{**run(1.0), "outputs": same}, {**run(1.0), "outputs": {"config.json": "a"}}]}
    assert harness.output_differences(runs, "streamconv", "streamconv") == []
    assert harness.output_differences(runs, "streamconv", "streamconv-dist") == [
        "round 2: model.safetensors only in streamconv's output"]
    runs["streamconv-dist"][0] = {**run(1.0), "outputs": {**same, "model.safetensors": "c"}}
    assert "round 1: model.safetensors differs between streamconv and streamconv-dist" in \
        harness.output_differences(runs, "streamconv", "streamconv-dist")
    assert harness.output_differences({"a": [run(1.0)], "b": [run(1.0)]}, "a", "b") == [
        "round 1: no digest of a's output"]
    assert harness.output_differences({"a": [killed()], "b": [run(1.0)]}, "a", "b") == [
        "round 1: no digest of a's output (OOM-killed)"]


def test_summary_takes_medians_and_keeps_spread():
    s = harness.summarize([run(5.0, rss=300), run(1.0, rss=100), run(2.0, rss=900)])
    assert (s["wall"], s["wall_min"], s["wall_max"]) == (2.0, 1.0, 5.0)
    assert s["throughput"] == 5.0 and s["peak_rss"] == 300 and s["peak_rss_max"] == 900
    assert harness.median_run([run(5.0), run(1.0), run(2.0)])["wall"] == 2.0


def test_record_roundtrip_previous_and_compare(tmp_path):
    old = record("2026-01-01T10:00:00+00:00", {"copy": [2.0] * 3, "streamconv": [4.0] * 3})
    other = record("2026-01-01T11:00:00+00:00", {"copy": [1.0] * 3, "streamconv": [1.0] * 3}, profile="small")
    new = record("2026-01-01T12:00:00+00:00", {"copy": [2.0] * 3, "streamconv": [3.0] * 3}, rss=110)
    for r in (old, other):
        harness.write_record(r, tmp_path)
    path = harness.write_record(new, tmp_path)
    assert path.name == "20260101T120000-medium-L2.json" and len(list(tmp_path.glob("*.json"))) == 3

    previous = harness.previous_record(tmp_path, new, exclude=path)
    assert previous["started"] == old["started"]  # not the newer record of another profile
    assert harness.previous_record(tmp_path, old) is None
    assert harness.previous_record(tmp_path, {**new, "source_dtype": "fp32"}, exclude=path) is None
    assert harness.previous_record(tmp_path, {**new, "source_dtype": "bf16"}, exclude=path) == previous

    lines = "\n".join(harness.compare(previous, new))
    assert "streamconv: wall 4.00 -> 3.00 s (-25.0%)" in lines
    assert "peak RSS 0.000 -> 0.000 GB (+10.0%)" in lines
    assert "streamconv/copy: wall ratio 2.00 -> 1.50 (-25.0%)" in lines


def test_table_lists_contenders_and_ratios():
    text = harness.table(record("t", {"copy": [2.0, 2.0, 2.0], "naive": [8.0] * 3, "streamconv": [4.0] * 3}))
    assert "| streamconv | 4.00 | 4.00–4.00 |" in text
    assert "| streamconv/copy | 2.00 | 2.00, 2.00, 2.00 |" in text
    assert "| streamconv/naive | 0.50 |" in text


def test_ci_fails_when_streamconv_did_not_convert():
    r = harness.make_record({"largest_rearranged_bytes": 100}, {"copy": [run(1.0)], "streamconv": [killed()]})
    assert ci_failures(r, {"baseline_rss": 1, "rss_budget": 2000, "ratio_ceiling": 10.0}) == [
        "streamconv did not convert every round: OOM-killed"]


def test_ci_fails_with_a_reason_on_memory_or_speed():
    r = record("t", {"copy": [1.0] * 3, "streamconv": [2.0, 9.0, 10.0]}, rss=2000)
    r["largest_rearranged_bytes"] = 100
    ok = {"baseline_rss": 1000, "rss_budget": 2000, "ratio_ceiling": 10.0}
    assert ci_failures(r, ok) == []
    failures = ci_failures(r, {**ok, "rss_budget": 1999, "ratio_ceiling": 8.0})
    assert len(failures) == 2
    assert "peak RSS" in failures[0] and "exceeds the budget" in failures[0]
    assert "streamconv/copy wall-time ratio 9.00 exceeds the ceiling 8.0" in failures[1]


def test_scaling_verdict():
    small, gb = {"wall": 5.0, "peak_rss": 1.0e9}, 10**9
    lines, ok = scaling_verdict(small, {"wall": 11.0, "peak_rss": 1.05e9}, 1 * gb, 4 * gb)
    assert ok and "2.00 s per extra GB, 3.00 s fixed" in lines[1]
    assert not scaling_verdict(small, {"wall": 11.0, "peak_rss": 1.5e9}, gb, 4 * gb)[1]  # RSS grew
    assert not scaling_verdict(small, {"wall": 25.0, "peak_rss": 1.0e9}, gb, 4 * gb)[1]  # superlinear


def test_profiles_keep_gpt_sw3_20b_shapes():
    medium, large = PROFILES["medium"].model(), PROFILES["large"].model()
    assert weight_bytes(medium) == pytest.approx(2.62e9, rel=0.01)
    assert weight_bytes(large) == pytest.approx(8.06e9, rel=0.01)
    assert 0.9e9 < weight_bytes(PROFILES["small"].model()) < 1.3e9
    assert largest_rearranged(medium) == largest_rearranged(PROFILES["small"].model()) == 24576 * 6144 * 2


def test_40b_profile_has_gpt_sw3_40b_shapes():
    model = PROFILES["40b"].model()
    assert (model.n_embd, model.n_head, model.ffn, model.n_layer, model.vocab_size) == (8192, 64, 32768, 2, 64000)
    assert weight_bytes(model) == pytest.approx(4.3e9, rel=0.01)
    assert largest_rearranged(model) == 32768 * 8192 * 2


def test_fp32_source_doubles_the_weight_bytes_not_the_adam_state():
    medium = PROFILES["medium"].model()
    assert weight_bytes(medium, "fp32") == 2 * weight_bytes(medium) == pytest.approx(5.25e9, rel=0.01)
    assert largest_rearranged(medium, "fp32") == 2 * largest_rearranged(medium)
    adam = checkpoint_bytes(medium, True) - weight_bytes(medium)  # 12 bytes per parameter in both
    assert checkpoint_bytes(medium, True, "fp32") - weight_bytes(medium, "fp32") == adam == 6 * weight_bytes(medium)


def test_fp32_checkpoint_is_a_separate_cached_file(tmp_path):
    bf16, fp32 = ensure_checkpoint(TINY, tmp_path), ensure_checkpoint(TINY, tmp_path, dtype="fp32")
    assert (bf16.name, fp32.name) == ("tiny-L1.ckpt", "tiny-L1-fp32.ckpt")
    weights = torch.load(fp32, weights_only=False)["state_dict"]
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert sum(t.nbytes for t in weights.values()) == weight_bytes(TINY.model(), "fp32")
    reference = torch.load(bf16, weights_only=False)["state_dict"]
    assert all(torch.equal(weights[k].to(torch.bfloat16), v) for k, v in reference.items())
    assert ensure_checkpoint(TINY, tmp_path, dtype="fp32") == fp32  # reused, not regenerated


def test_measure_reports_the_childs_own_peak_and_timeline():
    child = "import time; b = bytearray(200 * 2**20); time.sleep(0.4)"  # 200 MiB written: anonymous
    m = measure([sys.executable, "-c", child])
    assert m.returncode == 0 and m.wall >= 0.4
    assert 200 * 2**20 < m.peak_rss < 300 * 2**20
    assert m.peak_anon > 150 * 2**20
    assert len(m.timeline) >= 4 and all(a <= r for _, r, a in m.timeline)
    assert measure([sys.executable, "-c", "raise SystemExit(3)"], check=False).returncode == 3


def test_lean_checkpoint_has_the_same_weights(tmp_path):
    model = SyntheticModel(n_embd=64, n_layer=2, n_head=4, vocab_size=1000)
    make_checkpoint(tmp_path / "full.ckpt", model, optimizer=False)
    lean = make_checkpoint(tmp_path / "lean.ckpt", model, optimizer=True, keep_hf=False)
    assert lean.hf_state_dict == {}
    assert sorted(os.listdir(tmp_path)) == ["full.ckpt", "lean.ckpt"]  # the zeros scratch file is gone
    full = torch.load(tmp_path / "full.ckpt", weights_only=False)["state_dict"]
    saved = torch.load(tmp_path / "lean.ckpt", weights_only=False)
    assert list(saved["state_dict"]) == list(full)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in full.items())
    assert sum(t.nbytes for t in full.values()) == weight_bytes(model)
    state = saved["optimizer_states"][0]["optimizer"]["state"]
    assert len(state) == len(full)
    for i, w in enumerate(full.values()):
        assert state[i]["exp_avg"].shape == w.shape and state[i]["exp_avg"].dtype == torch.float32
        assert not state[i]["exp_avg_sq"].any()


def test_mcore_shards_are_the_legacy_tp_rank_files_stacked():
    """Each rank's chunks are its legacy TP rank file's tensors (Megatron's split), one per layer; replicated
    tensors are rank 0's alone; together the chunks tile every global tensor once."""
    model = SyntheticModel(n_embd=32, n_layer=3, n_head=4, vocab_size=500, tensor_model_parallel_size=2)
    weights = to_nemo_state_dict(random_gpt2_state_dict(model, torch.bfloat16), model)
    legacy = split_for_parallel(weights, 2, 1)
    shards = [mcore_shards(weights, 2, rank) for rank in range(2)]
    assert list(shards[0]) == list(shards[1])
    assert len(shards[0]) == 4 + 12  # embeddings and final norm, and 12 stacked layer tensors
    for key, tensor in weights.items():
        name, layer = mcore_name(key)
        assert name.startswith(STACKED if layer is not None else "model.")
        for rank in range(2):
            shape, chunks = shards[rank][name]
            assert shape == ((3, *tensor.shape) if layer is not None else tuple(tensor.shape))
            mine = [t[0] for o, t in chunks if o[0] == layer] if layer is not None else [t for _, t in chunks]
            replicated = torch.equal(legacy[0, 0][key], legacy[1, 0][key]) and legacy[0, 0][key].shape == tensor.shape
            if replicated and rank == 1:
                assert mine == []
            else:
                assert len(mine) == 1 and torch.equal(mine[0], legacy[rank, 0][key])
    for name, (shape, _) in shards[0].items():
        covered = torch.zeros(shape, dtype=torch.int32)
        for rank in range(2):
            for offsets, t in shards[rank][name][1]:
                covered[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape, strict=True))] += 1
        assert bool((covered == 1).all()), name


def test_distributed_workload_is_the_ckpt_in_megatron_cores_layout(tmp_path):
    """torch's own reader gets back the .ckpt's weights, stacked; streamconv converts both to the same bytes."""
    import pickle

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from streamconv.converter import convert

    profile = Profile("t", layers=2, vocab_size=500, n_embd=32, n_head=4, n_inner=64, n_positions=16)
    folder = ensure_distributed(profile, tmp_path, None, 2)
    ckpt = tmp_path / "t-L2.ckpt"
    assert folder.name == "t-L2-tp2.dist"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name, folder.name])  # no scratch left
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json"]
    saved = torch.load(ckpt, weights_only=False)
    common = torch.load(folder / "common.pt", weights_only=False)
    assert common["hyper_parameters"] == saved["hyper_parameters"] and common["global_step"] == 100

    dcp_to_torch_save(str(folder), str(tmp_path / "oracle.pt"))
    oracle = torch.load(tmp_path / "oracle.pt", weights_only=False)
    for key, tensor in saved["state_dict"].items():
        name, layer = mcore_name(key)
        assert torch.equal(oracle[name] if layer is None else oracle[name][layer], tensor), key
    assert torch.load(oracle[STACKED + "mlp.linear_fc1._extra_state/shard_1_2"], weights_only=True) == [None]
    with open(folder / ".metadata", "rb") as f:
        chunks = {k: [tuple(c.offsets) for c in v.chunks] for k, v in pickle.load(f).state_dict_metadata.items()
                  if hasattr(v, "chunks")}
    assert chunks[STACKED + "self_attention.linear_qkv.weight"] == [(0, 0, 0), (1, 0, 0), (0, 48, 0), (1, 48, 0)]
    assert chunks[STACKED + "mlp.linear_fc2.weight"] == [(0, 0, 0), (1, 0, 0), (0, 0, 32), (1, 0, 32)]
    assert chunks[STACKED + "mlp.linear_fc2.bias"] == [(0, 0), (1, 0)]

    for name, src in (("ckpt", ckpt), ("dist", folder)):
        convert(src, tmp_path / name, vocab_size=500)
    assert harness.digests(tmp_path / "ckpt") == harness.digests(tmp_path / "dist")


def test_the_llama_workload_is_a_distributed_checkpoint_streamconv_converts(tmp_path):
    """The benchmark's Llama writer lays fc1 out as megatron-core does ([gate; up] globally, each rank's halves
    apart): torch's own reading of it, mapped in the test, equals the conversion."""
    import torch
    from safetensors.torch import load_file

    import streamconv
    from benchmarks.llama import LlamaModel, ensure_llama
    from tests.test_mcore_writer import whole

    model = LlamaModel(hidden=64, heads=4, groups=2, ffn=128, vocab_size=256, n_layer=2, positions=64)
    folder = ensure_llama(tmp_path, model, 2)
    streamconv.convert(folder, tmp_path / "hf", vocab_size=256)
    got = load_file(tmp_path / "hf" / "model.safetensors")
    sd = whole(folder, "model.")
    fc1 = sd["decoder.layers.mlp.linear_fc1.weight"][1]
    assert torch.equal(got["model.layers.1.mlp.gate_proj.weight"], fc1[:128])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], fc1[128:])
    qkv = sd["decoder.layers.self_attention.linear_qkv.weight"][0].reshape(2, 4, 16, 64)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], qkv[:, 2].reshape(32, 64))
    assert torch.equal(got["lm_head.weight"], sd["output_layer.weight"])


FIXTURES = Path(__file__).parent / "fixtures"
# Byte for byte the same in every run folder Bridge 0.6.2 saves at step 0 (the synthetic ones included)
BRIDGE_SAME_BYTES = ("latest_checkpointed_iteration.txt", "latest_train_state.pt", "iter_0000000/train_state.pt",
                     "iter_0000000/metadata.json")


def bridge_layout(run: Path) -> dict:
    """What a Megatron-Bridge run folder holds, as far as the benchmark's writer controls it: its files (tokenizer
    assets aside: Bridge writes them only when handed a tokenizer), each tensor's shape, dtype and chunks with their
    files, each byte item's file, and the common state."""
    import io

    from torch.distributed.checkpoint import FileSystemReader

    weights = run / "iter_0000000"
    md = FileSystemReader(str(weights)).read_metadata()
    placed: dict[str, list] = {}
    for index, info in md.storage_data.items():
        placed.setdefault(index.fqn, []).append((tuple(index.offset or ()), info.relative_path))
    tensors = {k: (tuple(v.size), v.properties.dtype, sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks),
                   sorted(placed[k])) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    items = {k: placed[k] for k, v in md.state_dict_metadata.items() if not hasattr(v, "size")}
    common = next(info for index, info in md.storage_data.items() if index.fqn == "common_state/shard_0_1")
    with open(weights / common.relative_path, "rb") as f:
        f.seek(common.offset)
        common_state = torch.load(io.BytesIO(f.read(common.length)), weights_only=False)
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and "tokenizer" not in p.parts)
    return {"files": files, "tensors": tensors, "byte_items": items, "common_state": common_state,
            "same_bytes": {name: (run / name).read_bytes() for name in BRIDGE_SAME_BYTES}}


def test_the_bridge_workload_is_laid_out_as_bridge_saves_llama_and_converts_with_no_flag(tmp_path):
    """`--profile bridge8b`: at the Llama fixture's sizes the writer gives the run folder Megatron-Bridge 0.6.2 saved
    at TP 2 (files, keys without a prefix, chunks and byte items in each rank's file, the common state, the train
    state); converted with no flag, the same model folder as the NeMo-style llama8b workload's."""
    import streamconv
    from benchmarks import harness
    from benchmarks.llama import LlamaModel, ensure_llama

    model = LlamaModel(hidden=64, heads=4, groups=2, ffn=160, vocab_size=256, n_layer=2, positions=4096)
    bridge = ensure_llama(tmp_path / "cache", model, 2, bridge=True)
    assert bridge.name == "bridge8b-L2-tp2.run"
    assert bridge_layout(bridge) == bridge_layout(FIXTURES / "bridge062/tp2")
    result = streamconv.convert(bridge, tmp_path / "bridge")
    assert "vocabulary 256 from the 'model' section of run_config.yaml" in result.summary()
    streamconv.convert(ensure_llama(tmp_path / "cache", model, 2), tmp_path / "llama", vocab_size=256)
    assert harness.digests(tmp_path / "bridge") == harness.digests(tmp_path / "llama")


def test_the_qwen3moe_workload_converts_with_no_flag_expert_by_expert(tmp_path):
    """`--profile qwen3moe`: at the MoE fixture's sizes, the run folder Megatron-Bridge 0.6.2 saved with expert
    parallelism 2 (grouped experts stacked over layers, a chunk per layer and expert and fc1 half, EP rank r holding
    experts [2r, 2r + 2) and their byte items; the rest on rank 0): converted with no flag, each expert's
    projections are its chunks bit for bit, and config.json says the experts and the router's top-k."""
    import json
    import pickle

    import torch
    from safetensors.torch import load_file

    import streamconv
    from benchmarks.qwen3moe import Qwen3MoeModel, ensure_qwen3moe
    from tests.test_mcore_writer import whole

    model = Qwen3MoeModel(hidden=64, heads=4, groups=2, head_dim=32, ffn=96, experts=4, moe_ffn=48, topk=2,
                          vocab_size=256, n_layer=2, positions=4096)
    folder = ensure_qwen3moe(tmp_path / "cache", model)
    mine, bridge = bridge_layout(folder), bridge_layout(FIXTURES / "bridge062-moe/qwen3_moe/ep2")
    for layout in (mine, bridge):  # megatron-core spreads the chunks both EP ranks hold (all but the experts) over
        # the two files; the writer keeps them in rank 0's (below): the same tensors and chunks, other files
        layout["tensors"] = {k: v if "experts" in k else v[:3] for k, v in layout["tensors"].items()}
    assert mine == bridge
    with open(folder / "iter_0000000/.metadata", "rb") as f:
        storage = pickle.load(f).storage_data
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    placed = {(tuple(k.offset), v.relative_path) for k, v in storage.items() if k.fqn == fc1}
    assert ((1, 3, 48, 0), "__1_0.distcp") in placed and ((1, 1, 0, 0), "__0_0.distcp") in placed and len(placed) == 16
    assert {v.relative_path for k, v in storage.items() if "experts" not in k.fqn} == {"__0_0.distcp"}

    result = streamconv.convert(folder, tmp_path / "hf")
    assert "vocabulary 256 from the 'model' section of run_config.yaml" in result.summary()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["num_experts"], config["num_experts_per_tok"], config["head_dim"],
            config["moe_intermediate_size"], config["mlp_only_layers"]) == (["Qwen3MoeForCausalLM"], 4, 2, 32, 48, [])
    got, sd = load_file(tmp_path / "hf" / "model.safetensors"), whole(folder / "iter_0000000")
    experts = "decoder.layers.mlp.experts.experts."
    for layer in range(2):
        for e in range(4):
            mine = f"model.layers.{layer}.mlp.experts.{e}."
            assert torch.equal(got[mine + "gate_proj.weight"], sd[experts + "linear_fc1.weight"][layer, e, :48])
            assert torch.equal(got[mine + "up_proj.weight"], sd[experts + "linear_fc1.weight"][layer, e, 48:])
            assert torch.equal(got[mine + "down_proj.weight"], sd[experts + "linear_fc2.weight"][layer, e])
    assert torch.equal(got["model.layers.1.mlp.gate.weight"], sd["decoder.layers.mlp.router.weight"][1])
    assert torch.equal(got["lm_head.weight"], sd["output_layer.weight"])


def test_the_nemotronh_workload_is_laid_out_as_bridge_saves_a_hybrid_and_converts_with_no_flag(tmp_path):
    """`--profile nemotronh`: at the hybrid fixture's sizes and pattern (`M*M-`), the writer gives the keys, global
    shapes and chunks Megatron-Bridge 0.6.2 saved at TP 2 (each rank's file the fixture's rank's); converted with
    no flag, a Mamba mixer's in_proj is its .z/.x/.B/.C/.dt blocks and its conv1d its .x/.B/.C, bit for bit."""
    import json

    import torch
    from safetensors.torch import load_file

    import streamconv
    from benchmarks.nemotronh import NemotronHModel, ensure_nemotronh, pattern_of
    from tests.test_mcore_writer import whole

    assert (pattern_of(None), pattern_of(8), pattern_of(2)) == ("M-M*M-", "M-M*M-M-", "M-")
    model = NemotronHModel(hidden=64, pattern="M*M-", mamba_heads=4, mamba_head_dim=16, state=16, mamba_groups=2,
                           heads=4, groups=2, head_dim=16, ffn=96, vocab_size=256, positions=4096)
    folder = ensure_nemotronh(tmp_path / "cache", model)
    fixture = FIXTURES / "bridge062-hybrid/nemotron_h/tp2"
    assert bridge_layout(folder) == bridge_layout(fixture)

    result = streamconv.convert(folder, tmp_path / "hf")
    assert "vocabulary 256 from the 'model' section of run_config.yaml" in result.summary()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["hybrid_override_pattern"], config["mamba_num_heads"],
            config["n_groups"], config["conv_kernel"]) == (["NemotronHForCausalLM"], "M*M-", 4, 2, 4)
    got, sd = load_file(tmp_path / "hf" / "model.safetensors"), whole(folder / "iter_0000000")
    for layer in (0, 2):
        mixer, mine = f"decoder.layers.{layer}.mixer.", f"backbone.layers.{layer}.mixer."
        assert torch.equal(got[mine + "in_proj.weight"],
                           torch.cat([sd[mixer + "in_proj.weight." + b] for b in ("z", "x", "B", "C", "dt")]))
        for field in ("weight", "bias"):
            assert torch.equal(got[f"{mine}conv1d.{field}"],
                               torch.cat([sd[f"{mixer}conv1d.{field}.{b}"] for b in "xBC"]))
        assert torch.equal(got[mine + "out_proj.weight"], sd[mixer + "out_proj.weight"])
    assert torch.equal(got["backbone.layers.3.mixer.up_proj.weight"], sd["decoder.layers.3.mlp.linear_fc1.weight"])
    assert torch.equal(got["lm_head.weight"], sd["output_layer.weight"])
