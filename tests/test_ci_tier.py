"""`make test` (what CI runs) skips the tests marked `slow`, yet must still run every real
component at least once. This names, per component, the test that does, and fails when that
test is gone, renamed or marked slow."""

from __future__ import annotations

import importlib

import pytest

# component -> (module, test) of `make test` that runs it for real, on loopback
CI_TIER = {
    "MLflow registry (SQLite store)": (
        "tests.test_registry",
        "test_better_promoted_worse_not_rollback_restores",
    ),
    "DVC (dvc repro of the whole pipeline)": (
        "tests.test_pipeline_e2e",
        "test_every_stage_ran_and_wrote_sensible_outputs",
    ),
    "Prefect (a flow run on a real API)": (
        "tests.test_flows",
        "test_failing_stage_fails_the_flow_with_its_message_and_registers_nothing",
    ),
    "Great Expectations (the validation suite)": (
        "tests.test_validation",
        "test_bad_dataset_fails_with_each_problem_named",
    ),
    "bentoml serve (real HTTP)": ("tests.test_service", "test_ready_and_real_image_gets_its_class"),
    "a real browser (Chromium)": ("tests.test_service", "test_web_page_in_a_real_browser"),
    "ONNX Runtime (export, checked)": (
        "tests.test_stages",
        "test_chain_of_stages_produces_consistent_outputs",
    ),
    "torchrun (DDP, two processes)": (
        "tests.test_distributed",
        "test_torchrun_trains_with_two_ddp_processes",
    ),
}


def marks(obj: object) -> list[str]:
    found = getattr(obj, "pytestmark", [])
    return [m.name for m in (found if isinstance(found, list) else [found])]


@pytest.mark.parametrize("component", list(CI_TIER))
def test_make_test_runs_every_real_component(component: str) -> None:
    module_name, name = CI_TIER[component]
    module = importlib.import_module(module_name)
    test = getattr(module, name, None)
    where = f"{module_name}.{name}"
    assert test is not None, f"{where} is gone: name another test that runs {component}"
    assert "slow" not in marks(module) + marks(test), (
        f"{where} is marked slow, so CI no longer runs {component}"
    )
