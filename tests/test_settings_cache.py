"""Settings-keyed JSON caches: reused only under the same settings; unreadable ones are recomputed, not fatal."""

from __future__ import annotations

import json

from pti_plugin.settings_cache import read_cache
from pti_plugin.protocol.premise import Parts


def test_a_cache_is_read_only_under_its_own_settings(tmp_path):
    path = tmp_path / "scores.json"
    assert read_cache(path, {"seeds": 4}, "scores") is None  # missing
    path.write_text(json.dumps({"settings": {"seeds": 4}, "scores": {"a": 1}}))
    assert read_cache(path, {"seeds": 4}, "scores") == {"a": 1}
    assert read_cache(path, {"seeds": 8}, "scores") is None
    assert read_cache(path, {"seeds": 4}, None) == {"settings": {"seeds": 4}, "scores": {"a": 1}}
    for broken in ('{"settings": {"seeds": 4}, "scores": ', "[1, 2]", ""):
        path.write_text(broken)
        assert read_cache(path, {"seeds": 4}, "scores") is None
    path.write_bytes(b"\xff\xfe\x00")
    assert read_cache(path, {"seeds": 4}, "scores") is None


def test_a_truncated_premise_part_is_measured_again(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": 3.0}

    parts = Parts(tmp_path, log=lambda line: None)
    assert parts.get("null", {"n": 1}, compute)["value"] == 3.0
    assert parts.get("null", {"n": 1}, compute)["value"] == 3.0 and len(calls) == 1  # reused
    part = tmp_path / "parts" / "null.json"
    part.write_text(part.read_text()[:10])  # cut short
    assert parts.get("null", {"n": 1}, compute)["value"] == 3.0 and len(calls) == 2
