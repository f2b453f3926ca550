"""The load test script end to end in miniature (2 clients, a few seconds, the demo model): it runs, counts no
errors and writes both result files with every figure."""

from __future__ import annotations

import json

import pytest

from bench import load_test


@pytest.mark.slow
def test_load_test_smoke(tmp_path):
    code = load_test.main(["--clients", "2", "--duration", "6", "--warmup", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "load.json").read_text())
    assert code == 0 and result["errors"] == 0, result["error_kinds"]
    assert result["completed_after_warmup"] >= 2
    for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "rss_drift_pct"):
        assert result[key] is not None, key
    assert "| errors other than 429 + Retry-After | 0 | 0 |" in (tmp_path / "load.md").read_text()
