"""A small local TFDS dataset (`local_text_corpus`) built offline from a JSONL corpus directory.

It turns `<source_dir>/{train,validation}-*.jsonl` (e.g. the stdlib corpus) into TFDS
ArrayRecord files, then reads them back like any TFDS dataset, without TensorFlow:

    build_local_tfds(source_dir, data_dir)            # once; a no-op when already prepared
    tfds.data_source("local_text_corpus", split="train", data_dir=data_dir)   # or the URI
    "tfds:local_text_corpus@<data_dir>"               # in InputConfig.sources

Records are {"text": bytes}. Preparing needs only `tensorflow_datasets` + `array_record`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from typing import ClassVar

import tensorflow_datasets as tfds
from etils import epath

SPLITS = ("train", "validation")


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over local JSONL shards (field "text"); splits train / validation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default resolves the package via `importlib_resources`, which is not installed
        # here; this file's own path is what it would find (used only to look for checksums).
        return epath.Path(__file__)

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
        # source_dir is only needed to *prepare*; reading a prepared dataset works without it.
        self._source_dir = pathlib.Path(source_dir) if source_dir is not None else None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local JSONL text corpus (e.g. the Python stdlib corpus).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        if self._source_dir is None:
            raise ValueError("LocalTextCorpus needs source_dir=... to prepare the dataset")
        return {s: self._generate_examples(sorted(self._source_dir.glob(f"{s}-*.jsonl")))
                for s in SPLITS}

    def _generate_examples(self, files: list[pathlib.Path]):
        for path in files:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path.name}:{lineno}", {"text": json.loads(line)["text"]}


def build_local_tfds(source_dir: str | os.PathLike, data_dir: str | os.PathLike) -> LocalTextCorpus:
    """Prepare `local_text_corpus` from `source_dir` into `data_dir` (ArrayRecord files)."""
    tfds.disable_progress_bar()
    builder = LocalTextCorpus(source_dir=source_dir, data_dir=os.fspath(data_dir),
                              file_format="array_record")
    builder.download_and_prepare()
    return builder
