"""Every shipped pretraining gin config parses and builds consistent objects (no training)."""

import os

import gin
import pytest

from internlm2_jax import param_count
from internlm2_jax.gin_setup import model_config, parse_gin
from internlm2_jax.input import InputConfig
from internlm2_jax.train import pretraining  # noqa: F401  (registers `train`)

ROOT = os.path.dirname(os.path.dirname(__file__))
PRE = os.path.join(ROOT, "experiments", "configs", "pretrain")


def _parse(*files):
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    parse_gin([os.path.join(PRE, f) for f in files], [])


@pytest.mark.parametrize("name,params", [("internlm2_1_8b", 1_889_110_016), ("internlm2_7b", 7_737_708_544),
                                         ("internlm2_20b", 19_861_149_696)])
def test_report_presets(name, params):
    _parse(f"{name}.gin")
    cfg = model_config()
    assert param_count(cfg) == params
    assert cfg.rope_theta == 50000.0 and cfg.compute_dtype == "bfloat16"
    assert gin.query_parameter("InputConfig.seq_len") == 4096
    tokens = gin.query_parameter("InputConfig.global_batch_size") * 4096 * gin.query_parameter("train.num_steps")
    assert 1.7e12 < tokens < 2.4e12  # ~90 % of the report's 2.0–2.6T tokens


def test_stage_overlays():
    _parse("internlm2_7b.gin", "stage2_long_context.gin")
    assert model_config().rope_theta == 1e6
    assert gin.query_parameter("InputConfig.seq_len") == 32768
    assert gin.query_parameter("train.init_from") is not None
    _parse("internlm2_7b.gin", "stage2_long_context.gin", "stage3_capability.gin")
    assert gin.query_parameter("InputConfig.seq_len") == 4096
    cfg = InputConfig(**{k: gin.query_parameter(f"InputConfig.{k}") for k in ("sources", "mixture")})
    assert set(cfg.mixture) == set(cfg.sources)
