"""`m2pt train` as a user runs it: flags, bad data reported by record index with exit status 2, pushing a
bundle to a server over real HTTP, options checked before any training."""

from __future__ import annotations

import argparse
import json
import threading
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from training.cli import add_train_commands, config_from_args, main


def make_json(tmp_path, bad_index=None):
    folder = tmp_path / "imgs"
    folder.mkdir()
    records = []
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 255 - 40 * i, 0)).save(folder / f"{i}.png")
        records.append(
            {
                "image": f"imgs/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat is this digit ?"},
                    {"from": "gpt", "value": str(i)},
                ],
            }
        )
    if bad_index is not None:
        records[bad_index]["conversations"][1]["value"] = ""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, folder


def flags(model_dir, data, out, *extra):
    return [
        "--base",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--text-prompts",
        "2",
        "--visual-prompts",
        "1",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_parser_defaults_are_the_m2pt_recipe():
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--base", "b", "--data", "digits", "--out", "o"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.epochs) == (7e-4, 0.0, 0.03, 3.0)
    assert (cfg.visual_prompts, cfg.text_prompts, cfg.tune_projector) == (10, 10, True)
    args = parser.parse_args(
        ["train", "--base", "b", "--data", "digits", "--out", "o", "--no-tune-projector", "--steps", "5"]
    )
    assert config_from_args(args).tune_projector is False and config_from_args(args).steps == 5
    assert callable(args.func)


def test_bad_record_fails_with_its_index_or_is_skipped(tiny_model_dir, tmp_path, capsys):
    data, _ = make_json(tmp_path, bad_index=3)
    assert main(flags(tiny_model_dir, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "record 3: empty answer in turn 0" in err and "--on-bad-record skip" in err
    assert not (tmp_path / "out").exists()
    assert main(flags(tiny_model_dir, data, tmp_path / "out", "--on-bad-record", "skip")) == 0
    assert "bundle out ->" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_options_are_checked_before_training(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data, _ = make_json(tmp_path)
    monkeypatch.delenv("M2PT_OPS_TOKEN", raising=False)
    assert main(flags(tiny_model_dir, data, tmp_path / "o1", "--push-url", "http://127.0.0.1:9")) == 2
    assert "M2PT_OPS_TOKEN" in capsys.readouterr().err
    assert main(flags(tiny_model_dir, data, tmp_path / "o2", "--push-url", "file:///etc/passwd")) == 2
    assert "http(s) URL" in capsys.readouterr().err
    assert main(flags(tiny_model_dir, data, tmp_path / "o3", "--batch-size", "0")) == 2
    assert "--batch-size must be positive" in capsys.readouterr().err
    assert main(flags(tmp_path / "no-model", data, tmp_path / "o4")) == 2
    assert "could not be loaded" in capsys.readouterr().err
    assert main(flags(tiny_model_dir, data, tmp_path / "o5", "--resume")) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []
    checked: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = BytesParser().parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
        )
        parts = {
            p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
            for p in message.get_payload()
        }
        Receiver.received.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "parts": parts}
        )
        reply = json.dumps({"name": "pushed", "version": "v1"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self):  # noqa: N802 -- the pre-training check: GET /v1/bundles with the token, as the server
        Receiver.checked.append({"path": self.path, "auth": self.headers.get("Authorization")})
        reply = json.dumps({"bundles": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Receiver.received, Receiver.checked = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_uploads_manifest_and_tensors_with_the_ops_token(
    tiny_model_dir, tmp_path, monkeypatch, receiver
):
    data, _ = make_json(tmp_path)
    monkeypatch.setenv("M2PT_OPS_TOKEN", "s3cret")
    out = tmp_path / "pushed"
    assert main(flags(tiny_model_dir, data, out, "--push-url", receiver)) == 0
    (call,) = Receiver.received
    assert call["path"] == "/v1/bundles" and call["auth"] == "Bearer s3cret"
    assert Receiver.checked == [{"path": "/v1/bundles", "auth": "Bearer s3cret"}]  # checked before training
    assert call["parts"]["manifest"] == (out / "manifest.json").read_bytes()
    assert call["parts"]["tensors"] == (out / "tensors.safetensors").read_bytes()


def test_every_train_config_field_is_a_flag_documented_by_its_field():
    """The parser is generated from `TrainConfig`: one flag per field, its help the field's `metadata["help"]`,
    its default the field's default, and the flag names users already type."""
    from dataclasses import MISSING, fields

    from training.cli import add_train_arguments
    from training.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert list(actions) == [f.name for f in fields(TrainConfig)]
    for f in fields(TrainConfig):
        action = actions[f.name]
        assert action.help.startswith(f.metadata["help"]), f.name
        assert action.required == (f.default is MISSING), f.name
        if f.default is not MISSING:
            assert action.default == f.default, f.name
    flags = [opt for a in actions.values() for opt in a.option_strings]
    assert flags == [
        *(
            "--base",
            "--data",
            "--out",
            "--name",
            "--version",
            "--eval-data",
            "--image-folder",
            "--train-size",
        ),
        *("--eval-size", "--eval-fraction", "--on-bad-record", "--visual-prompts", "--text-prompts"),
        *("--tune-projector", "--no-tune-projector", "--steps", "--epochs", "--batch-size", "--lr"),
        *("--projector-lr", "--weight-decay", "--warmup-ratio", "--max-grad-norm", "--seed", "--eval-every"),
        *("--eval-batch-size", "--checkpoint-dir", "--checkpoint-every", "--resume", "--publish-store"),
        *("--push-url", "--device", "--dtype", "--no-progress"),
    ]
    args = parser.parse_args(["--base", "b", "--data", "d", "--out", "o", "--resume", "--no-progress"])
    cfg = config_from_args(args)
    assert cfg.resume is True and cfg.progress is False and cfg.on_bad_record == "fail" and cfg.steps is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--base", "b", "--data", "d", "--out", "o", "--steps", "3", "--epochs", "2"])
