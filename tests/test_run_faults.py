"""Faults around a training run that need no training: checkpoint integrity, the workdir lock, a torn or stale
`metrics.jsonl`, bad config values, corrupt HF weights, accuracy on ties, exit codes (issue 16)."""

import errno
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import pretrain as pretrain_cli
from hf_fixtures import TINY_HF, random_hf_tensors, write_hf_checkpoint
from internlm2_jax import errors
from internlm2_jax.checkpoint_integrity import verify
from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer
from internlm2_jax.train.metrics_log import DISCARDED, MetricsLog, read_metrics
from internlm2_jax.workdir_lock import WorkdirLock

ROOT = os.path.dirname(os.path.dirname(__file__))
TEST_GIN = os.path.join(ROOT, "tests", "configs", "pretrain_test.gin")
SYNC = CheckpointConfig(async_save=False)


def _state(scale: float = 1.0) -> dict:
    return {"params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * scale,
                       "b": jnp.ones(4, jnp.bfloat16)}, "step": jnp.int32(3)}


def _abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state())


def test_checksums_catch_a_changed_value_and_values_are_checked():
    from internlm2_jax.checkpoint_integrity import integrity_meta

    meta = integrity_meta(_state())
    assert verify(_state(), meta) is None
    flipped = _state()
    flipped["params"]["w"] = flipped["params"]["w"].at[1, 2].set(
        jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(jnp.float32(6.0), jnp.uint32) ^ 1, jnp.float32))
    assert "checksum mismatch in params/w" in verify(flipped, meta)
    assert "absurd values in params/w" in verify(_state(5.7e36 / 11), None)  # no checksums: values still checked
    nan = _state()
    nan["params"]["b"] = nan["params"]["b"].at[0].set(jnp.nan)
    assert "non-finite values in params/b" in verify(nan, None)


def test_restore_skips_absurd_checkpoint_and_keeps_it_on_disk(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path), SYNC)
    ckpt.save(1, _state())
    ckpt.save(2, _state(5.7e36 / 11))  # garbage written with valid checksums (corrupt before the save)
    with caplog.at_level(logging.WARNING):
        step, state, _ = ckpt.restore(_abstract())
    ckpt.close()
    assert step == 1 and float(state["params"]["w"][0, 1]) == 1.0
    assert "checkpoint step 2" in caplog.text and "absurd values" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing renamed or deleted while reading


def test_structure_mismatch_is_an_error_that_touches_nothing(tmp_path):
    ckpt = Checkpointer(str(tmp_path), SYNC)
    ckpt.save(1, _state())
    before = sorted(os.walk(tmp_path))
    wrong = dict(_abstract(), params={"w": jax.ShapeDtypeStruct((3, 5), jnp.float32),
                                      "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
    with pytest.raises(errors.CheckpointMismatchError, match=r"params/w: checkpoint shape \(3, 4\) vs this run's"):
        ckpt.restore(wrong, expect_model={"intermediate_size": "96"})
    ckpt.close()
    assert sorted(os.walk(tmp_path)) == before


def test_second_lock_names_the_holder(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(errors.WorkdirBusyError, match=f"in use by pid {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
    WorkdirLock(str(tmp_path)).acquire().release()  # free again once released


def test_metrics_rewound_on_resume_torn_line_kept_aside(tmp_path, caplog):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 5, "lo')  # torn by a crash
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    with caplog.at_level(logging.WARNING):
        MetricsLog(str(tmp_path), resume_step=2, tensorboard=False).close()
    assert "metrics.jsonl:5" in caplog.text
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    aside = (tmp_path / DISCARDED).read_text().splitlines()
    assert aside == rows[2:] + ['{"step": 5, "lo']  # superseded rows and the torn one: kept, not lost
    MetricsLog(str(tmp_path), resume_step=0, tensorboard=False).close()  # fresh start: earlier rows set aside
    assert read_metrics(str(tmp_path)) == [] and len((tmp_path / DISCARDED).read_text().splitlines()) == 5


@pytest.mark.parametrize("binding,names", [
    ("OptimizerConfig.peak_lr=-1", "OptimizerConfig.peak_lr=-1"),
    ("train.num_steps=-5", "train.num_steps=-5"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0"),
    ("train.log_every=0", "train.log_every=0"),
    ("InputConfig.global_batch_size=0", "InputConfig.global_batch_size=0"),
    ("InputConfig.seq_len=0", "InputConfig.seq_len=0"),
    ("train.num_steps=abc", "train.num_steps=abc"),
    ("train.num_steps='abc'", "train.num_steps='abc'"),
])
def test_bad_values_are_one_line_naming_the_binding(tmp_path, capsys, binding, names):
    code = pretrain_cli.main(["--gin", TEST_GIN, "--workdir", str(tmp_path / "w"), "--gin_param", binding])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == errors.EXIT_BAD_CONFIG
    assert err[-1].startswith("error: ") and names in err[-1], err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_seq_len_beyond_max_positions_warns_with_rope(caplog):
    from internlm2_jax.config import get_preset
    from internlm2_jax.sharding import MeshConfig, make_mesh, validate

    cfg = get_preset("tiny", max_position_embeddings=64)
    with caplog.at_level(logging.WARNING):
        validate(cfg, make_mesh(MeshConfig()), seq_len=128)
    assert "seq_len=128 exceeds the model's max_position_embeddings=64" in caplog.text and "RoPE" in caplog.text


def test_hf_folder_with_absurd_or_nan_weights_is_refused(tmp_path):
    from internlm2_jax import load_hf

    for name, value in (("nan", np.nan), ("garbage", 5.7e36)):
        tensors = random_hf_tensors(TINY_HF)
        tensors["model.layers.1.feed_forward.w2.weight"][3, 4] = value
        write_hf_checkpoint(str(tmp_path / name), TINY_HF, tensors)
        with pytest.raises(errors.CheckpointCorruptError, match="model.layers.1.feed_forward.w2.weight"):
            load_hf(str(tmp_path / name))


def test_tied_logits_are_not_counted_correct():
    from internlm2_jax.train.loss import chunked_cross_entropy

    hidden = jnp.ones((1, 4, 8), jnp.float32)
    targets, weights = jnp.array([[1, 2, 3, 0]]), jnp.ones((1, 4), jnp.float32)
    collapsed = chunked_cross_entropy(hidden, jnp.zeros((8, 16)), targets, weights)  # every logit equal
    assert float(collapsed["correct"]) == 0.0
    head = jnp.zeros((8, 16)).at[:, 2].set(1.0)  # token 2 is the unique maximum everywhere
    assert float(chunked_cross_entropy(hidden, head, targets, weights)["correct"]) == 1.0


def test_disk_full_is_one_line_with_its_exit_code(capsys):
    def full() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/8")

    assert cli.run_main(full) == errors.EXIT_DISK
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full writing /w/checkpoints/8" in err[0]

    def through_gin() -> int:  # a configurable re-raises the error as gin's proxy (its OSError fields empty)
        import gin.utils

        try:
            raise OSError(errno.ENOSPC, "checkpoint step 8 needs about 1.6 MiB, 0.2 MiB free", "/w/checkpoints")
        except OSError as e:
            gin.utils.augment_exception_message_and_reraise(e, "\n  In call to configurable 'train' (<fn>)")

    assert cli.run_main(through_gin) == errors.EXIT_DISK
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: disk full writing /w/checkpoints (checkpoint step 8 needs about 1.6 MiB, 0.2 MiB free); "
                   "the previous checkpoint is intact: free space and run the same command to resume"]


def test_params_only_load_verifies_checksums(tmp_path):
    from internlm2_jax.checkpointing import load_parameters_only

    big = {"params": {"w": jnp.linspace(-1.0, 1.0, 1 << 14, dtype=jnp.float32).reshape(128, 128)},
           "step": jnp.int32(1)}
    ckpt = Checkpointer(str(tmp_path), SYNC)
    ckpt.save(1, big)
    ckpt.close()
    abstract = {"w": jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=big["params"]["w"].sharding)}
    assert np.array_equal(load_parameters_only(str(tmp_path), abstract)["w"], big["params"]["w"])
    data = max((os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "1" / "state") for f in fs),
               key=os.path.getsize)
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x04
    open(data, "wb").write(raw)
    with pytest.raises(errors.CheckpointCorruptError, match="checksum mismatch in params/w"):
        load_parameters_only(str(tmp_path), abstract)
