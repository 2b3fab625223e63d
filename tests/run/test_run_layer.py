"""The run layer: identities that ignore runtime keys and reach every later stage, stage records that refuse another
configuration, one greedy decoder that equals per-row generation, the P3 instruction's demonstration count."""
from __future__ import annotations

import json

import pytest

from tagi_ds.config import load_config
from tagi_ds.errors import ArtifactMismatchError
from tagi_ds.io_utils import sha256_json
from tagi_ds.run.decode import decode_prompts, length_batches
from tagi_ds.run.identity import check_stage_record, write_stage_record
from tagi_ds.run.paths import RunPaths
from tagi_ds.run.prompts import num_demonstrations, prompt_settings
from tagi_ds.train import backbone_stage, cache_logits, finetune, pretrain, teacher
from tests.tiny import WORD_VOCAB, eager_llama, eager_t5, word_tokenizer


def test_identities_ignore_runtime_keys_and_follow_their_inputs():
    base = load_config(None, ["data.source=synthetic"])
    runtime = load_config(None, ["data.source=synthetic", "name=other", "threads=3", "teacher.time_budget_s=5",
                                 "finetune.log_every=3", "eval.batch_size=2", "cache.batch_size=2"])
    for stage in (teacher, cache_logits, pretrain, finetune):
        assert stage.identity(base) == stage.identity(runtime), stage.__name__
    lr = load_config(None, ["data.source=synthetic", "teacher.lr=0.5"])
    assert teacher.identity(lr) != teacher.identity(base) and cache_logits.identity(lr) != cache_logits.identity(base)
    assert finetune.identity(lr) != finetune.identity(base)  # the KL / L_ins targets changed
    assert pretrain.identity(lr) == pretrain.identity(base)  # stage 1 never reads the teachers
    # a new tiny-backbone recipe reaches every stage through the backbone's identity
    wider = load_config(None, ["data.source=synthetic", "backbone.tiny_hidden=64"])
    for stage in (backbone_stage, teacher, pretrain, finetune):
        assert stage.identity(wider) != stage.identity(base), stage.__name__


def test_a_stage_record_refuses_another_configuration_naming_the_key(tmp_path):
    ident = {"lr": 0.1, "data": {"max_tasks": 2}}
    record = check_stage_record(tmp_path, "demo", ident)
    assert record["hash"] == sha256_json(ident)
    write_stage_record(tmp_path, record)
    assert check_stage_record(tmp_path, "demo", ident) is None  # same: nothing to write
    with pytest.raises(ArtifactMismatchError, match=r"data\.max_tasks: 2 -> 3"):
        check_stage_record(tmp_path, "demo", {"lr": 0.1, "data": {"max_tasks": 3}})
    assert json.loads((tmp_path / "stage.json").read_text())["identity"] == ident  # untouched


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_the_one_decoder_equals_each_row_alone(arch):
    """Length-sorted batches with padding (left for causal models) give every row exactly what generating it alone
    gives, in input order."""
    # every id decodes to a word, and a wide init makes the output depend on the input
    model = (eager_t5(seed=3, vocab_size=len(WORD_VOCAB), initializer_factor=8.0) if arch == "t5" else
             eager_llama(seed=3, vocab_size=len(WORD_VOCAB), initializer_range=0.3))
    tok = word_tokenizer(arch)
    texts = ["is the sky blue", "yes", "the answer is it true maybe", "green w1 w2", "no no"]
    prompts = [tok(t)["input_ids"] for t in texts]
    got = decode_prompts(model, tok, arch, prompts, device="cpu", max_new_tokens=5, batch_size=2)
    alone = [decode_prompts(model, tok, arch, [p], device="cpu", max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert got == alone and len(set(got)) > 1
    assert length_batches([3, 1, 2, 1], 2) == [[1, 3], [2, 0]]


def test_the_p3_instruction_holds_its_configured_demonstrations():
    p3 = load_config(None, ["data.source=p3", "data.p3_num_demonstrations=16", "data.num_pos_examples=2"])
    sni = load_config(None, ["data.source=sni", "data.p3_num_demonstrations=16", "data.num_pos_examples=2"])
    assert num_demonstrations(p3.data) == prompt_settings(p3, "t5").num_pos == 16
    assert num_demonstrations(sni.data) == prompt_settings(sni, "t5").num_pos == 2


def test_every_run_path_lives_under_the_run_folder(tmp_path):
    paths = RunPaths(tmp_path / "r")
    spelled = [paths.backbone, paths.teacher("u"), paths.cache_shard("t"), paths.pretrain_export,
               paths.finetune_export("tagi"), paths.baseline("tk_instruct"), paths.predictions("tagi", "seen"),
               paths.tb("finetune/tagi"), paths.report, paths.eval_archive("ab" * 20), paths.markers]
    assert all(p.is_relative_to(tmp_path / "r") for p in spelled)
    with pytest.raises(Exception, match="folder name"):
        paths.teacher("../escape")
