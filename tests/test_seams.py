"""The seams of the attention contract: the Engine and the jitted steps call a policy's hooks and never test its
name or its flags (shared architecture: "no policy names, no policy flags")."""

import dataclasses
import re
from pathlib import Path

import pytest

from lcm.cache.policies import POLICIES, KVPolicy

ROOT = Path(__file__).resolve().parents[1] / "lcm"
FLAGS = [name for name in vars(KVPolicy) if not name.startswith("_") and not callable(getattr(KVPolicy, name))]
FLAGS += ["bounded", "budget"] + [f.name for f in dataclasses.fields(KVPolicy)]


@pytest.mark.parametrize("module", ["generate.py", "steps.py"])
def test_the_engine_and_the_steps_read_no_policy_flag_and_no_policy_name(module: str) -> None:
    source = (ROOT / module).read_text()
    flags = sorted({flag for flag in FLAGS if flag != "name"} | {"streaming", "renumber", "evicts", "needs_scores"})
    read = [f for f in flags if re.search(rf"policy\.{f}\b", source)]
    assert not read, f"{module} reads policy flags {read}; call a hook instead"
    names = [name for name in POLICIES if name != "full" and re.search(rf"\b{name}\b", source, re.IGNORECASE)]
    imports = re.findall(r"^from lcm\.cache\.(\w+) import", source, re.MULTILINE)
    assert not names, f"{module} names policies {names}"
    assert set(imports) <= {"kv", "hooks", "policies"}, f"{module} imports a particular policy: {imports}"


def test_locret_labels_come_from_the_models_own_forward() -> None:
    """Locret's labelling pass records through a hook in the model's training forward: no layer loop, projection,
    rotation or attention call of its own (shared architecture: "Locret's label pass uses the model's forward")."""
    source = (ROOT / "train" / "locret_labels.py").read_text()
    own = [call for call in ("project_qkv", "apply_rope", "attention(", "lax.scan", ".mlp(") if call in source]
    assert not own, f"locret_labels.py runs parts of the model itself: {own}"
    assert "train_forward(" in source
