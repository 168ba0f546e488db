"""`push`: only verified, unaltered outputs go to the hub, in one commit; tested up to the network boundary."""

import pytest
import torch
from click.testing import CliRunner

import cli
from weight_edit.checkpoint import Checkpoint
from weight_edit.publish import PublishError, push


class FakeApi:
    """Records the hub calls instead of making them."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture
def verified(tmp_path, tiny_model):
    out = tmp_path / "edited"
    assert (
        CliRunner()
        .invoke(cli.main, ["apply", "--model", str(tiny_model), "--direction", str(bare(tmp_path)), "--out", str(out)])
        .exit_code
        == 0
    )
    result = CliRunner().invoke(cli.main, ["verify", str(out), "--device", "cpu", "--new-tokens", "2"])
    assert result.exit_code == 0, result.output
    return out


def bare(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"direction": torch.randn(32)}, str(path))
    return path


def test_dry_run_lists_exactly_the_output_files(verified):
    result = CliRunner().invoke(cli.main, ["push", str(verified), "--repo-id", "me/edited", "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = [line for line in result.output.splitlines() if line and not line.startswith("would upload")]
    expected = sorted(p.name for p in verified.iterdir())
    assert listed == expected
    assert {"README.md", "config.json", "weight_edit_provenance.json", "weight_edit_verify.json"} <= set(listed)
    assert set(Checkpoint(verified).shards) <= set(listed)


def test_push_creates_the_repo_and_uploads_once(verified):
    api = FakeApi()
    files = push(verified, "me/edited", private=True, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/edited", "repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][1]["allow_patterns"] == files and api.calls[1][1]["folder_path"] == str(verified.resolve())


def test_unverified_output_is_refused(tmp_path, tiny_model):
    from weight_edit.writer import apply_direction

    out = apply_direction(Checkpoint(tiny_model), torch.randn(32), tmp_path / "out").out
    with pytest.raises(PublishError, match="has not been verified"):
        push(out, "me/edited", api=FakeApi())


def test_altered_shard_is_refused_even_after_verify(verified):
    shard = verified / Checkpoint(verified).shards[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    api = FakeApi()
    result = CliRunner().invoke(cli.main, ["push", str(verified), "--repo-id", "me/edited", "--dry-run"])
    assert result.exit_code == 2 and "altered" in result.output and "Traceback" not in result.output
    with pytest.raises(PublishError, match="altered"):
        push(verified, "me/edited", api=api)
    assert api.calls == []


def edit_json(path, **changes):
    import json

    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize(
    "name,alter,expected",
    [
        ("tokenizer_config.json", lambda p: edit_json(p, model_max_length=7), "was altered after `apply`"),
        ("chat_template.jinja", lambda p: p.write_text(p.read_text() + "{{ 'x' }}"), "was altered after `apply`"),
        ("generation_config.json", lambda p: edit_json(p, temperature=1.7), "was altered after `apply`"),
        ("weight_edit_provenance.json", lambda p: edit_json(p, base_model="someone/else"), "was altered after `apply`"),
        ("README.md", lambda p: p.write_text(p.read_text() + "\nA line added by hand.\n"), "was altered after"),
        ("added.py", lambda p: p.write_text("print('hello')\n"), "was not written by `apply`"),
    ],
)
def test_any_altered_or_added_file_is_refused_after_verify(verified, name, alter, expected):
    path = verified / name
    alter(path)
    api = FakeApi()
    with pytest.raises(PublishError) as info:
        push(verified, "me/edited", api=api)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
    assert api.calls == []
    result = CliRunner().invoke(cli.main, ["push", str(verified), "--repo-id", "me/edited", "--dry-run"])
    assert result.exit_code == 2 and name in result.output and "Traceback" not in result.output


def test_output_of_an_older_apply_is_refused(verified):
    """Without file records nothing vouches for the tokenizer or the chat template: apply again to publish."""
    import json

    from weight_edit.writer import PROVENANCE_FILE, PROVENANCE_SEAL

    provenance = json.loads((verified / PROVENANCE_FILE).read_text())
    del provenance["output"]["files"]
    (verified / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    (verified / PROVENANCE_SEAL).unlink()
    with pytest.raises(PublishError, match="records no hashes of the files beside the weights"):
        push(verified, "me/edited", api=FakeApi())
