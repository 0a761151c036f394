"""The command line's error handling, `denoise serve`'s deployments, and the
download task's retry policy against a flaky server on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import yaml

from flows.cli import main
from flows.serve import PREFECT_YAML, build_deployments


@pytest.mark.parametrize(
    "argv, message, by_argparse",
    [
        (["train", "--noise-level", "-1"], "level", False),
        (["train", "--epochs", "0"], "epochs", False),
        (["train", "--architecture", "resnet-9000"], "unknown architecture", False),
        (["train", "--reframe", "1.5"], "reframe", False),
        (
            ["train", "--architecture", "seed", "--reframe", "0.5"],
            "invalid options: architecture seed is tied to its input frame",
            False,
        ),
        (
            ["train", "--epochs", "0"],
            "invalid --epochs: Input should be greater than or equal to 1",
            False,
        ),
        (["train", "--train-limit", "3"], "invalid --train-limit", False),
        (
            ["train", "--noise-level", "7"],
            "a gaussian level is the standard deviation on [0, 1] pixels, from 0 to 2",
            False,
        ),
        (["train", "--noise-kind", "awgn", "--noise-level", "0,300"], "from 0 to 255", False),
        (["train", "--warm-start", "no-such-model"], "model 'no-such-model' not found", False),
        (
            ["train", "--architecture", "unet", "--warm-start", "no-such-model"],
            "model 'no-such-model' not found",
            False,
        ),
        (["train", "--noise-kind", "pink"], "invalid choice: 'pink'", True),
        (["train", "--noise-level", "a,b"], "not a number", True),
    ],
)
def test_train_rejects_bad_options_with_one_line(argv, message, by_argparse, capsys, tmp_path):
    with pytest.raises(SystemExit) if by_argparse else _no_raise():
        code = main(["--store", str(tmp_path), *argv])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "downloads").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_serve_builds_the_deployments_of_prefect_yaml():
    specs = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    deployments = {d.name: d for d in build_deployments()}
    assert (
        set(deployments) == set(specs) == {"nightly", "nightly-photos", "inbox", "inbox-on-arrival"}
    )
    # the inbox run by events: a folder run per burst that `denoise watch --emit-only` announces
    [trigger] = deployments["inbox-on-arrival"].triggers
    assert trigger.expect == {"denoise.inbox.files-landed"}
    assert trigger.parameters["input_dir"] == "{{ event.payload.input_dir }}"
    nightly, inbox = deployments["nightly"], deployments["inbox"]
    # the photographs' nightly: the same flow pointed at train400 by a parameter, its schedule off
    photos = deployments["nightly-photos"]
    assert photos.flow_name == "train-denoiser" and photos.parameters == {
        "data": {"dataset": "train400"}
    }
    assert [s.active for s in photos.schedules] == [False] and nightly.schedules[0].active
    assert "train400" in nightly.description
    assert nightly.flow_name == "train-denoiser" and inbox.flow_name == "denoise-folder"
    assert nightly.schedules[0].schedule.cron == "0 3 * * *"
    assert nightly.schedules[0].schedule.timezone == "UTC"
    assert inbox.schedules[0].schedule.interval.total_seconds() == 900
    assert nightly.concurrency_limit == 1 and nightly.enforce_parameter_schema
    assert inbox.parameters == specs["inbox"]["parameters"]
    # the parameter schema the UI and API enforce comes from the pydantic configs
    from prefect.utilities.callables import parameter_schema

    from flows.training import train_pipeline

    schema = parameter_schema(train_pipeline).model_dump()
    assert {"data", "noise", "training", "evaluation", "store"} <= set(schema["properties"])
    assert schema["definitions"]["TrainConfig"]["properties"]["epochs"]["minimum"] == 1


@pytest.fixture()
def flaky_mirror(mnist_mirror):
    """Serves the MNIST mirror; the first request for a .gz answers 503."""
    seen: dict[str, int] = {}
    failed: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen[self.path] = seen.get(self.path, 0) + 1
            if self.path.endswith(".gz") and not failed:
                failed.append(self.path)
                self.send_error(503, "try again")
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(mnist_mirror))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    server.shutdown()
    server.server_close()


def test_download_task_retries_transient_errors_only(prefect_harness, flaky_mirror, tmp_path):
    from prefect import flow

    from denoiser.config import DataConfig
    from tasks.download import download_dataset

    url, seen = flaky_mirror
    fast = download_dataset.with_options(retry_delay_seconds=0)

    @flow
    def fetch(source: str, store: str) -> dict:
        return fast(DataConfig(source=source), store)

    manifest = fetch(url, str(tmp_path / "a"))
    assert {f["status"] for f in manifest["files"].values()} == {"fetched"}
    assert seen["/train-images-idx3-ubyte.gz"] == 2  # a 503, then the retry

    seen.clear()
    with pytest.raises(Exception, match="HTTP 404"):
        fetch(url + "missing/", str(tmp_path / "b"))
    # the mirror probes (SHA256SUMS, <source>/mnist/SHA256SUMS) and the one file once: a 404 is not retried
    assert seen["/missing/train-images-idx3-ubyte.gz"] == 1
    assert all(n == 1 for n in seen.values()) and len(seen) <= 3


def test_train_options_become_the_flow_configs():
    from denoiser.config import NoiseConfig, TrainConfig
    from flows.cli import _train_configs, build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--noise-level",
            "0.1,0.7",
            "--level-density",
            "uniform",
            "--loss",
            "mse",
            "--epochs",
            "3",
        ]
    )
    configs = _train_configs(args)
    assert configs["noise"].level == (0.1, 0.7) and configs["noise"].level_density == "uniform"
    assert configs["training"].loss == "mse" and configs["training"].epochs == 3
    default = _train_configs(build_parser().parse_args(["train", "--noise-level", "0.1,0.7"]))
    assert default["noise"].level_density == "rising"
    # options left out keep the configs' own defaults, whatever they are
    bare = _train_configs(build_parser().parse_args(["train"]))
    assert bare["noise"] == NoiseConfig() and bare["training"] == TrainConfig()
    assert bare["training"].architecture == "auto"  # the dataset's own: unet for digits
    assert bare["training"].reframe is None  # the architecture's recipe decides
    recut = _train_configs(build_parser().parse_args(["train", "--reframe", "0", "--seed", "3"]))
    assert recut["training"].reframe == 0.0 and recut["training"].seed == recut["noise"].seed == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--level-density", "falling"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--store", "{store}", "models"],
        ["models", "--store", "{store}"],
        ["models", "--store={store}", "list"],
    ],
)
def test_global_options_work_before_or_after_the_command(argv, capsys, tmp_path):
    store = tmp_path / "elsewhere"
    assert main([a.format(store=store) for a in argv]) == 0
    out = capsys.readouterr().out
    assert f"no models in {store}" in out


def test_a_subcommand_never_resets_the_global_store(capsys, tmp_path):
    assert main(["--store", str(tmp_path / "top"), "models"]) == 0
    assert str(tmp_path / "top") in capsys.readouterr().out
