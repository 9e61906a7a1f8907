"""DataLoader workers by device: train.trainer.loader_workers, train.num_workers and --num-workers."""

from __future__ import annotations

import argparse

import pytest
import torch

from train.args import add_train_args
from train.config import load_config
from train.trainer import loader_workers


def test_cpu_gets_no_workers_unless_set():
    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers(0, torch.device("cuda")) == 0  # an explicit 0 is kept on a GPU too


def test_cuda_gets_up_to_8_workers_from_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None, torch.device("cuda:0")) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # torchrun, 16 processes on this machine
    assert loader_workers(None, torch.device("cuda:3")) == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(None, "cuda") == 1  # never 0 on a GPU: decoding in the training process stalls it


def test_presets_leave_gpu_workers_to_the_device():
    for name in ("base64", "sr256", "sr1024"):
        assert load_config(name).train.num_workers is None
    assert load_config("tiny-base").train.num_workers == 0


def test_num_workers_flag_and_bounds():
    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(["--config", "tiny-base", "--data", "d", "--workdir", "w", "--num-workers", "5"])
    assert args.num_workers == 5
    assert load_config("tiny-base", {"train.num_workers": 5}).train.num_workers == 5
    with pytest.raises(ValueError, match="num_workers"):
        load_config("tiny-base", {"train.num_workers": -1})
