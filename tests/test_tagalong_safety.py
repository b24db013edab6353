"""Files that travel with a checkpoint are copied as regular files from inside the source
folder only (issue #19's security part): no secret reaches the output through a link,
and plugins never load from the current folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tiny
from modelgrow.checkpoint import tagalong


def test_a_link_out_of_the_source_folder_never_reaches_the_output(tmp_path):
    src = tiny.gpt2(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    os.symlink(secret, src / "chat_template.jinja")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    os.symlink(src / "tokenizer_config.json", src / "special_tokens_map.json")  # a link inside: fine
    os.mkfifo(src / "vocab.txt")  # a FIFO would hang a naive copy
    report = tmp_path / "r.json"
    env = {**os.environ, "MODELGROW_PLUGINS": ""}
    result = subprocess.run([sys.executable, "-m", "modelgrow", "convert", str(src), "-o", str(tmp_path / "out"),
                             "--width", "2x", "--report", str(report), "-q"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert not (out / "chat_template.jinja").exists() and not (out / "vocab.txt").exists()
    assert all("hunter2" not in p.read_text(errors="replace") for p in out.iterdir() if p.is_file())
    assert (out / "special_tokens_map.json").read_text() == '{"model_max_length": 32}'
    assert not (out / "special_tokens_map.json").is_symlink()
    left = json.loads(report.read_text())["tagalong"]["left_behind"]
    assert "outside the source folder" in left["chat_template.jinja"] and left["vocab.txt"] == "not a regular file"
    assert "warning: chat_template.jinja was not copied" in result.stderr


def test_the_hugging_face_cache_layout_is_followed(tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/abc123", snap / "tokenizer.json")
    real, why = tagalong.vet(snap, "tokenizer.json")
    assert real == (repo / "blobs" / "abc123").resolve() and why is None


def test_big_files_stay_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tagalong, "MAX_BYTES", 10)
    (tmp_path / "merges.txt").write_text("x" * 11)
    real, why = tagalong.vet(tmp_path, "merges.txt")
    assert real is None and "over the 10-byte cap" in why


def test_plugins_never_load_from_the_current_folder(tmp_path):
    info = tmp_path / "sneaky-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sneaky\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[modelgrow]\nsneaky = sneaky_plugin\n")
    (tmp_path / "sneaky_plugin.py").write_text("open('RAN', 'w').write('code from the current folder ran')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MODELGROW_PLUGINS", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-m", "modelgrow", "plugins"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sneaky" not in result.stdout and not (tmp_path / "RAN").exists()


def test_licences_policies_and_chat_templates_travel(tmp_path):
    import torch

    from modelgrow.checkpoint import CheckpointWriter

    src = tmp_path / "src"
    src.mkdir()
    carried = ["LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md", "chat_template.json",
               "chat_template.jinja", "LICENSE-MIT", "notice.txt", "tool_use.jinja"]
    for name in carried:
        (src / name).write_text(f"text of {name}\n")
    (src / "README.md").write_text("the card: --keep-card's business\n")
    (src / "LICENSE.safetensors").write_text("not a licence")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "rag.jinja").write_text("{{ documents }}")
    (src / "additional_chat_templates" / "notes.txt").write_text("not a template")
    (tmp_path / "secret").write_text("hunter2")
    os.symlink(tmp_path / "secret", src / "COPYING")  # a licence by name, a link out by nature
    found = tagalong.survey(src)
    assert list(found.files) == ["chat_template.jinja", "chat_template.json", "LICENSE", "LICENSE.txt", "LICENSE.md",
                                 "NOTICE", "USE_POLICY.md", "LICENSE-MIT", "notice.txt", "tool_use.jinja",
                                 "additional_chat_templates/rag.jinja"]
    assert "outside the source folder" in found.left_behind["COPYING"]
    assert found.left_behind["additional_chat_templates/notes.txt"] == "not a chat template (*.jinja)"
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        section = tagalong.write(writer, found, 32, 64)
        writer.commit()
    out = tmp_path / "out"
    assert section["copied"] == list(found.files) and section["left_behind"] == found.left_behind
    for rel in section["copied"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes() and not (out / rel).is_symlink()
    assert not (out / "README.md").exists() and not (out / "COPYING").exists()
    assert not (out / "LICENSE.safetensors").exists()
    # A folder of templates that is a link out of the source folder is never entered.
    os.rename(src / "additional_chat_templates", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", src / "additional_chat_templates")
    found = tagalong.survey(src)
    assert "outside the source folder" in found.left_behind["additional_chat_templates/"]
    assert not any(rel.startswith("additional_chat_templates") for rel in found.files)
