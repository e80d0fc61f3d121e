"""Options are declared once, in the config dataclasses: the CLI and the Python API follow them."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from fer_batch.commands.process_cmd import CLI_ONLY, process
from fer_batch.config import OPTIONS, RunConfig, config_from_options
from fer_batch.errors import ConfigError


def _cli_options() -> dict[str, object]:
    """``fer-batch process`` parameters that are configuration options, with their defaults."""
    out = {}
    for name, p in inspect.signature(process).parameters.items():
        if name not in CLI_ONLY:
            out[name] = getattr(p.default, "default", p.default)
    return out


def test_every_cli_option_is_a_config_option_with_the_same_default():
    cli = _cli_options()
    assert set(cli) <= set(OPTIONS), f"CLI options without a config field: {sorted(set(cli) - set(OPTIONS))}"
    assert config_from_options(**cli) == RunConfig()  # the CLI's defaults are the config's


def test_options_name_existing_fields_and_unknown_names_list_the_valid_ones():
    for name, (section, field) in OPTIONS.items():
        holder = RunConfig() if section is None else getattr(RunConfig(), section)
        assert field in {f.name for f in dataclasses.fields(holder)}, name
    with pytest.raises(ConfigError, match="valid options: .*fps"):
        config_from_options(fsp=2)


def test_tracker_tuning_is_configuration_and_validated_there():
    cfg = RunConfig()
    assert cfg.to_dict()["track"]["gate_sigma"] == 3.0  # recorded with the outputs
    with pytest.raises(ConfigError, match="w_motion"):
        cfg.replace(track={"w_motion": 0.9})
    with pytest.raises(ConfigError, match="segment-seconds"):
        config_from_options(segment_seconds=0)
    with pytest.raises(ConfigError, match="gpus-per-worker"):
        config_from_options(runner="ray", device="cuda")
    assert config_from_options(runner="ray").segment_s == 300.0 and RunConfig().segment_s is None
