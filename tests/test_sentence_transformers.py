"""A sentence-transformers model keeps its packaging when it grows (issue #19): modules.json,
the module folders it lists (Pooling's width set to the grown one, Normalize's folder made
even when empty), sentence_bert_config.json's max_seq_length as it was. A Dense module,
whose weights act on the hidden size, stays behind with its reason, and modules.json with
it; a module path that leaves the source folder is never followed."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import tiny
from modelgrow.checkpoint import CheckpointWriter, tagalong
from modelgrow.cli import main

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
DENSE = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
POOLING_CONFIG = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                  "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "grow", "a", "model", "the", "is"]


def package(folder, modules=(TRANSFORMER, POOLING, NORMALIZE)):
    """Write a sentence-transformers packaging, as its save() does, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(list(modules), indent=2))
    (folder / "sentence_bert_config.json").write_text('{\n  "max_seq_length": 256,\n  "do_lower_case": false\n}')
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"__version__": {"sentence_transformers": "3.0.1"}, "prompts": {}, "default_prompt_name": None,
         "similarity_fn_name": "cosine"}, indent=2))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(POOLING_CONFIG, indent=2))
    (folder / "2_Normalize").mkdir()
    return folder


def st_model(folder):
    """A tiny BERT with a tokenizer and a sentence-transformers packaging."""
    src = package(tiny.bert(folder, mlm=False))
    (src / "vocab.txt").write_text("\n".join(WORDS + [f"w{i}" for i in range(96 - len(WORDS))]) + "\n")
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true, '
                                               '"model_max_length": 64}')
    (src / "LICENSE").write_text("Apache License, Version 2.0\n")
    (src / "USE_POLICY.md").write_text("# Acceptable use\n")
    return src


def convert(src, out, *extra):
    report = out.parent / f"{out.name}.json"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--width", "2x", "--report", str(report),
                                       "-q", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())["tagalong"], result.output


def carry(src, hidden=32, grown=64, name="out"):
    """Only the tag-along files of ``src`` into a new checkpoint folder: (the folder, the report section)."""
    out = src.parent / name
    with CheckpointWriter(out) as writer:
        writer.add("w", torch.ones(1))
        section = tagalong.write(writer, tagalong.survey(src), hidden, grown)
        writer.commit()
    return out, section


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("st")
    src = st_model(tmp / "src")
    section, output = convert(src, tmp / "out")
    return src, tmp / "out", section, output


def test_the_packaging_travels_with_the_pooling_width_grown(grown):
    src, out, section, output = grown
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling == {**POOLING_CONFIG, "word_embedding_dimension": 64}
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "LICENSE",
                 "USE_POLICY.md", "vocab.txt", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    assert (out / "2_Normalize").is_dir() and not any((out / "2_Normalize").iterdir())
    assert section == {"left_behind": {}, "copied": [
        "tokenizer_config.json", "vocab.txt", "LICENSE", "USE_POLICY.md", "modules.json", "sentence_bert_config.json",
        "config_sentence_transformers.json", "1_Pooling/config.json", "2_Normalize/"]}
    assert "warning" not in output


def test_the_grown_model_embeds_at_the_grown_width(grown):
    """What sentence-transformers computes (mean pooling, then Normalize), with transformers."""
    import transformers

    _, out, _, _ = grown
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModel.from_pretrained(out).eval()
    batch = tok(["hello world", "grow a model"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    dim = json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"]
    assert emb.shape == (2, dim) == (2, 64)


def test_sentence_transformers_loads_the_grown_model(grown):
    st = pytest.importorskip("sentence_transformers")
    _, out, _, _ = grown
    model = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 256
    emb = model.encode(["hello world", "grow a model"], convert_to_tensor=True)
    assert emb.shape == (2, 64)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_a_regrown_output_can_be_overwritten(grown, tmp_path):
    """The empty 2_Normalize/ is in the marker: --overwrite still sees only what modelgrow wrote."""
    src, out, _, _ = grown
    again = tmp_path / "again"
    convert(src, again)
    convert(src, again, "--overwrite")
    assert (again / "2_Normalize").is_dir() and "2_Normalize/" in json.loads((again / ".modelgrow").read_text())["files"]


def test_a_dense_module_stays_behind_and_modules_json_with_it(tmp_path):
    src = package(tiny.bert(tmp_path / "src", mlm=False), (TRANSFORMER, POOLING, DENSE))
    dense = src / "2_Dense"
    dense.mkdir()
    (dense / "config.json").write_text('{"in_features": 32, "out_features": 16, "bias": true}')

    class Trap:  # unpickling this file writes RAN: it must never happen
        def __reduce__(self):
            return open, (str(tmp_path / "RAN"), "w")

    (dense / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    section, output = convert(src, tmp_path / "out")
    out = tmp_path / "out"
    left = section["left_behind"]
    assert "Dense module (32 -> 16 features)" in left["2_Dense/"] and "hidden size" in left["2_Dense/"]
    assert "2_Dense/" in left["modules.json"] and "missing module" in left["modules.json"]
    assert not (out / "modules.json").exists() and not (out / "2_Dense").exists()
    assert not (tmp_path / "RAN").exists()
    assert "warning: modules.json was not copied: it lists 2_Dense/" in output
    assert "warning: 2_Dense/ was not copied: a Dense module" in output
    # What does not depend on the Dense module still travels, correct for the grown model.
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 64
    assert (out / "sentence_bert_config.json").read_bytes() == (src / "sentence_bert_config.json").read_bytes()
    assert "modules.json" not in section["copied"] and "1_Pooling/config.json" in section["copied"]


def test_module_paths_out_of_the_source_folder_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"word_embedding_dimension": 32, "secret": "hunter2"}')
    src = tmp_path / "src"
    climbing = {**POOLING, "path": "../outside"}
    package(src, (TRANSFORMER, climbing, {**NORMALIZE, "path": "/etc"}, {**NORMALIZE, "path": "2_Normalize"}))
    os.rmdir(src / "2_Normalize")
    os.symlink(outside, src / "2_Normalize")  # a module folder that is a link out of the source folder
    out, section = carry(src)
    left = section["left_behind"]
    assert "module 1's path '../outside'" in left["modules.json"] and "not followed" in left["modules.json"]
    assert "module 2's path '/etc'" in left["modules.json"]
    assert "outside the source folder" in left["2_Normalize/"] and "2_Normalize/" in left["modules.json"]
    assert not (out / "modules.json").exists() and not (out / "2_Normalize").exists()
    assert not any("hunter2" in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert sorted(p.name for p in out.iterdir()) == [
        ".modelgrow", "config_sentence_transformers.json", "model.safetensors", "sentence_bert_config.json"]


@pytest.mark.parametrize("path", ["..", ".", "", "a/../../x", "a\\..\\x", ".hidden", "1_Pooling/", "x\x00y"])
def test_no_odd_module_path_is_followed(tmp_path, path):
    src = package(tmp_path / "src", (TRANSFORMER, {**POOLING, "path": path}))
    found = tagalong.survey(src)
    assert "modules.json" not in found.files and "not followed" in found.left_behind["modules.json"]
    assert not found.modules and all(not rel.startswith("1_Pooling") for rel in found.files)


def test_a_files_link_inside_a_module_folder_keeps_the_module_behind(tmp_path):
    (tmp_path / "secret").write_text("hunter2")
    src = package(tmp_path / "src")
    os.symlink(tmp_path / "secret", src / "2_Normalize" / "stolen")
    os.mkfifo(src / "1_Pooling" / "fifo")
    found = tagalong.survey(src)
    assert "outside the source folder" in found.left_behind["2_Normalize/"]
    assert found.left_behind["1_Pooling/"] == "fifo: not a regular file"
    assert [m.path for m in found.modules] == [] and "modules.json" not in found.files


def test_the_hugging_face_cache_layout_and_a_missing_normalize_folder(tmp_path):
    """A Hub snapshot links each file into blobs/ and has no empty folder (git keeps none)."""
    repo = tmp_path / "models--org--st"
    (repo / "blobs").mkdir(parents=True)
    staged = package(tmp_path / "staged")
    snap = repo / "snapshots" / "rev"
    (snap / "1_Pooling").mkdir(parents=True)
    for i, rel in enumerate(["modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]):
        (repo / "blobs" / f"h{i}").write_bytes((staged / rel).read_bytes())
        os.symlink(("../" * rel.count("/")) + f"../../blobs/h{i}", snap / rel)
    out, section = carry(snap)
    assert section["left_behind"] == {}
    assert section["copied"] == ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "2_Normalize/"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 64
    assert (out / "2_Normalize").is_dir() and not (out / "1_Pooling" / "config.json").is_symlink()


def test_a_pooling_width_that_is_not_the_hidden_size_stays_behind(tmp_path):
    src = package(tmp_path / "src")
    (src / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 48}')
    out, section = carry(src)
    assert "word_embedding_dimension 48 is not the hidden size 32" in section["left_behind"]["1_Pooling/"]
    assert "1_Pooling/" in section["left_behind"]["modules.json"]
    assert not (out / "1_Pooling").exists() and not (out / "modules.json").exists()
    assert (out / "2_Normalize").is_dir()
    _, same = carry(src, 32, 32, "same")  # not grown (train): nothing to change, all of it travels
    assert same["left_behind"] == {} and "modules.json" in same["copied"]


def test_modules_of_unknown_kinds_and_bad_listings_stay_behind(tmp_path):
    src = tmp_path / "src"
    custom = {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    package(src, (TRANSFORMER, POOLING, custom))
    (src / "2_LayerNorm").mkdir()
    found = tagalong.survey(src)
    assert "modelgrow does not know how it depends on the width" in found.left_behind["2_LayerNorm/"]
    assert "2_LayerNorm/" in found.left_behind["modules.json"]
    (src / "modules.json").write_text('{"not": "a list"}')
    assert "not a sentence-transformers module list" in tagalong.survey(src).left_behind["modules.json"]
    (src / "modules.json").write_text("[" * 100_000)
    assert tagalong.survey(src).left_behind["modules.json"] == "not valid JSON"
