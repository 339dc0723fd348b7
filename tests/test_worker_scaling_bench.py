"""benchmarks/bench_worker_scaling.py runs on the CPU with its three readers (the image stream and the feature cache's
stream) and its figures are consistent: worker 0 of W decodes its share of the epoch and reads all of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("bench_worker_scaling", "bench_cache", "photo_shards", "common"):
        sys.modules.pop(name, None)
    import bench_worker_scaling

    return bench_worker_scaling


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_worker_zero_reads_the_epoch_and_decodes_its_share(bench, capsys, cache: bool) -> None:
    argv = ["--samples", "128", "--batch-size", "16", "--workers", "1", "4"] + (["--cache"] if cache else [])
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["feature_cache"] is cache
    for reader in ("webdataset", "headers", "index"):
        one, four = report["runs"][reader]["1"], report["runs"][reader]["4"]
        assert one["samples_read"] == four["samples_read"] == 128  # every worker reads the whole epoch
        assert one["samples_decoded"] == 128 and 0 < four["samples_decoded"] < 128
        assert four["ceiling_img_per_s"] > 0 and one["read_cpu_ms_per_sample"] > 0
    # walking a sample: the index is cheaper than the tar headers, which are cheaper than webdataset's reader
    cost = {reader: report["runs"][reader]["4"]["read_cpu_ms_per_sample"] for reader in report["runs"]}
    assert cost["index"] < cost["headers"] < cost["webdataset"]
    assert set(report["ceiling_ratios"]) == {"index_vs_headers", "index_vs_webdataset", "headers_vs_webdataset"}
