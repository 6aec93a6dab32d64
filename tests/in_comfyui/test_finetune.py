"""SPELL Fair LoRA Trainer and the latent classifier on the demo model inside ComfyUI: the LoRA it writes is read
by ComfyUI's stock LoraLoaderModelOnly (every key applied, the weights merged as the training saw them), the input
MODEL is left as it was, Cancel keeps a checkpoint and resume continues it bit for bit, bad input names the node."""
import json
from pathlib import Path

import comfy.model_management as mm
import comfy.utils as comfy_utils
import folder_paths
import pytest
import torch

from helpers import sample

TARGET = ", ".join(f"{d}: 0.1" for d in range(10))


@pytest.fixture(scope="module")
def demo(comfy):
    nodes = comfy.NODE_CLASS_MAPPINGS
    model, vae, prompts = nodes["SpellDemoModelLoader"]().load()
    images, labels = nodes["SpellDemoDigitExamples"]().load(8)
    clf = nodes["SpellLatentClassifierTrainer"]().train(model, vae, "(none)", "test_clf", 64, 64, 4, 0.2, 0, True,
                                                        images, labels)["result"][0]
    pos = nodes["SpellDemoClassPrompt"]().encode(prompts, "any digit")[0]
    neg = nodes["SpellDemoClassPrompt"]().encode(prompts, "(empty)")[0]
    return model, clf, pos, neg


def train(comfy, demo, name, iterations=3, resume=False, every=2, **kw):
    model, clf, pos, neg = demo
    node = comfy.NODE_CLASS_MAPPINGS["SpellFairLoRATrainer"]()
    args = dict(model=model, positive=pos, negative=neg, classifier=clf, target=TARGET, name=name,
                iterations=iterations, batch_size=4, steps=1, cfg=4.0, rank=2, learning_rate=1e-3, seed=0,
                resume=resume, checkpoint_every=every)
    args.update(kw)
    return node.train(**args)


def test_classifier_trainer_saves_a_loadable_classifier(comfy, demo):
    clf = demo[1]
    assert clf.classes == [str(d) for d in range(10)] and clf.meta["held_out"] > 0
    loader = comfy.NODE_CLASS_MAPPINGS["SpellLatentClassifierLoader"]
    assert "test_clf.safetensors" in loader.INPUT_TYPES()["required"]["classifier_file"][0]
    back = loader().load("test_clf.safetensors")["result"][0]
    z = torch.randn(3, 4, 8, 8)
    assert torch.equal(back(z), clf(z))


def test_robust_classifier_reports_its_attacked_accuracy_and_refuses_nan(comfy, demo):
    nodes = comfy.NODE_CLASS_MAPPINGS
    model = demo[0]
    images, labels = nodes["SpellDemoDigitExamples"]().load(8)
    node = nodes["SpellLatentClassifierTrainer"]()
    out = node.train(model, nodes["SpellDemoModelLoader"]().load()[1], "(none)", "test_robust", 64, 64, 4, 0.2, 0,
                     True, images, labels, robustness=0.1)
    clf, report = out["result"]
    assert clf.meta["robustness"] == 0.1 and 0 <= clf.meta["held_out_attacked_accuracy"] <= 1
    assert "attacked at robustness 0.1" in report and report in out["ui"]["text"]
    with pytest.raises(ValueError, match="SpellLatentClassifierTrainer: robustness must be a finite number"):
        node.train(model, None, "(none)", "test_robust_nan", 64, 64, 4, 0.2, 0, True, images, labels,
                   robustness=float("nan"))


def test_the_lora_is_read_by_stock_lora_loader_model_only_and_the_input_model_is_unchanged(comfy, demo):
    model, clf, pos, neg = demo
    before = sample(comfy, model, (pos, neg), 2)
    out = train(comfy, demo, "test_fair")
    patched, report, chart = out["result"]
    assert "saved models/loras/test_fair.safetensors" in report and chart.shape[-1] == 3
    lora_file = Path(folder_paths.get_folder_paths("loras")[0], "test_fair.safetensors")
    log = json.loads(lora_file.with_name("test_fair.training.json").read_text())
    rows = log["iterations"]  # row 0: the validation before training
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3] and "validation_bias" in rows[0] and "validation_bias" in rows[-1]
    assert torch.equal(sample(comfy, model, (pos, neg), 2), before)  # hooks gone, weights untouched

    loader = comfy.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]
    assert "test_fair.safetensors" in loader.INPUT_TYPES()["required"]["lora_name"][0]
    stock = loader().load_lora_model_only(model, "test_fair.safetensors", 1.0)[0]
    sd = comfy_utils.load_torch_file(str(lora_file))
    paths = sorted(k[len("lora_unet_"):-len(".lora_up.weight")] for k in sd if k.endswith(".lora_up.weight"))
    assert len(paths) > 0 and len(stock.patches) == len(paths)  # every LoRA key mapped onto a weight
    net = model.model.diffusion_model
    modules = {name.replace(".", "_"): (name, m) for name, m in net.named_modules()}
    expected = {}
    for key in paths:
        name, m = modules[key]
        up, down = sd[f"lora_unet_{key}.lora_up.weight"], sd[f"lora_unet_{key}.lora_down.weight"]
        expected[name] = m.weight.detach().float() + float(sd[f"lora_unet_{key}.alpha"]) / down.shape[0] * up @ down
    assert any(float((up := sd[k]).abs().max()) > 0 for k in sd if k.endswith("lora_up.weight"))  # it trained
    mm.load_models_gpu([stock])
    try:
        for name, w in expected.items():
            assert torch.allclose(stock.model.diffusion_model.get_submodule(name).weight.float(), w, atol=1e-6), name
        with_lora = sample(comfy, stock, (pos, neg), 2)
    finally:
        mm.load_models_gpu([model])  # unpatched again
    assert not torch.equal(with_lora, before)
    assert torch.equal(sample(comfy, model, (pos, neg), 2), before)
    # the trainer's own output MODEL is the same LoRA through ComfyUI's loader
    assert torch.equal(sample(comfy, patched, (pos, neg), 2), with_lora)


def test_cancel_keeps_a_checkpoint_and_resume_continues_bit_for_bit(comfy, demo):
    train(comfy, demo, "test_straight", iterations=4)  # the run the resumed one must equal
    previous = comfy_utils.PROGRESS_BAR_HOOK

    def cancel_at_two(value, total, preview, node_id=None):
        if value == 2:
            mm.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(cancel_at_two)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(comfy, demo, "test_resumed", iterations=4)
    finally:
        mm.interrupt_current_processing(False)
        comfy_utils.set_progress_bar_global_hook(previous)
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    assert not (loras / "test_resumed.safetensors").exists()
    ckpt = Path(folder_paths.get_user_directory(), "spell", "training", "test_resumed.safetensors")
    assert ckpt.is_file()
    resumed = train(comfy, demo, "test_resumed", iterations=4, resume=True)
    assert "resumed at 2" in resumed["result"][1]
    a = comfy_utils.load_torch_file(str(loras / "test_straight.safetensors"))
    b = comfy_utils.load_torch_file(str(loras / "test_resumed.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="SpellFairLoRATrainer: .*other settings .*lr"):
        train(comfy, demo, "test_resumed", iterations=6, resume=True, learning_rate=2e-3)


def test_lowest_validation_bias_writes_the_ema_weights_of_that_validation(comfy, demo):
    out = train(comfy, demo, "test_best", iterations=5, every=1, learning_rate=0.3, ema_warmup=True,
                result="lowest validation bias")
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    log = json.loads((loras / "test_best.training.json").read_text())
    biases = [(r["validation_bias"], r["iteration"]) for r in log["iterations"]]
    assert len(biases) == 6  # before training and after each iteration
    best = min(biases)[1]  # the first of equal ones
    assert log["summary"]["written_iteration"] == best and log["summary"]["result"] == "lowest validation bias"
    assert f"written: the EMA weights of iteration {best} " in out["result"][1]
    written = comfy_utils.load_torch_file(str(loras / "test_best.safetensors"))
    if best == 0:  # the untrained LoRA: every up projection still zero
        assert all(float(v.abs().max()) == 0 for k, v in written.items() if k.endswith("lora_up.weight"))
    else:  # the same training stopped there writes the same file
        train(comfy, demo, "test_best_ref", iterations=best, every=1, learning_rate=0.3, ema_warmup=True)
        ref = comfy_utils.load_torch_file(str(loras / "test_best_ref.safetensors"))
        assert sorted(ref) == sorted(written) and all(torch.equal(ref[k], written[k]) for k in ref)
    last = train(comfy, demo, "test_best_last", iterations=5, every=1, learning_rate=0.3,
                 ema_warmup=True)
    assert "written:" not in last["result"][1]
    assert json.loads((loras / "test_best_last.training.json").read_text())["summary"]["written_iteration"] == 5
    if best < 5:  # training went on past the best: the last weights are another file
        final = comfy_utils.load_torch_file(str(loras / "test_best_last.safetensors"))
        assert any(not torch.equal(final[k], written[k]) for k in final)


def test_validation_seeds_set_the_validation_size_and_resume_keeps_it(comfy, demo):
    out = train(comfy, demo, "test_val16", iterations=2, every=1, validation_seeds=16)
    assert "validation bias (training classifier, 16 fixed seeds)" in out["result"][1]
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    log = json.loads((loras / "test_val16.training.json").read_text())
    assert log["summary"]["validation_seeds"] == 16
    shares = [r["validation_share"] for r in log["iterations"]]
    assert all(abs(sum(sh) - 1) < 1e-9 and all(round(x * 16, 9) == round(x * 16) for x in sh) for sh in shares)
    with pytest.raises(ValueError, match="SpellFairLoRATrainer: the checkpoint test_val16.safetensors was validated "
                                         "on 16 seeds; set validation_seeds to that"):
        train(comfy, demo, "test_val16", iterations=3, every=1, resume=True)
    resumed = train(comfy, demo, "test_val16", iterations=3, every=1, resume=True, validation_seeds=16)
    assert "resumed at 2" in resumed["result"][1]


def test_class_prompts_give_moved_images_their_new_class_prompts_reference(comfy, demo):
    nodes = comfy.NODE_CLASS_MAPPINGS
    _, _, prompts = nodes["SpellDemoModelLoader"]().load()
    encode = nodes["SpellDemoClassPrompt"]().encode
    digits = [entry for d in range(10) for entry in encode(prompts, str(d))[0]]  # Conditioning Combine's list
    with pytest.raises(ValueError, match="SpellFairLoRATrainer: class_prompts holds 3 prompts, the classifier 10 "
                                         "classes .*one prompt per class, in that order"):
        train(comfy, demo, "test_by_class", class_prompts=digits[:3])
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    logs = {}
    for name, extra in (("test_by_class", dict(class_prompts=digits)), ("test_same_prompt", {})):
        train(comfy, demo, name, iterations=2, target="3: 1", **extra)  # every image is assigned a three
        logs[name] = json.loads((loras / f"{name}.training.json").read_text())
    by_class, same = logs["test_by_class"], logs["test_same_prompt"]
    assert by_class["summary"]["settings"]["class_reference"] and not same["summary"]["settings"]["class_reference"]
    assert any(r["moved"] > 0 for r in by_class["iterations"][1:])
    # the same noise and the same first step: the alignment term agrees, the preservation term does not
    assert by_class["iterations"][1]["align"] == same["iterations"][1]["align"]
    assert by_class["iterations"][1]["preserve"] != same["iterations"][1]["preserve"]


@pytest.mark.parametrize("change, message", [
    (dict(target="1: 0.5, 2: 0.6"), "sum"),
    (dict(target="cat: 1"), "cat"),
    (dict(name="../x"), "name"),
    (dict(cfg=float("nan")), "cfg must be a finite number"),
    (dict(result="best"), "result must be one of last, lowest validation bias"),
    (dict(validation_seeds=4), "validation_seeds must be between 8 and 4096"),
])
def test_bad_input_names_the_node(comfy, demo, change, message):
    with pytest.raises(ValueError, match=f"SpellFairLoRATrainer: .*{message}"):
        change = dict(change)
        train(comfy, demo, change.pop("name", "test_bad"), **change)


RESAMPLED = dict(method="resampled own images", own_images=60, rounds=2, batch_size=8, steps=2, ema_warmup=True,
                 target="1: 0.5, 7: 0.5",
                 preservation=1.0)


@pytest.fixture(scope="module")
def sharper(comfy, demo):
    """A classifier of more examples than the module's, so that 60 images of "any digit" hold confident ones."""
    nodes = comfy.NODE_CLASS_MAPPINGS
    model = demo[0]
    images, labels = nodes["SpellDemoDigitExamples"]().load(40)
    vae = nodes["SpellDemoModelLoader"]().load()[1]
    clf = nodes["SpellLatentClassifierTrainer"]().train(model, vae, "(none)", "test_clf_sharp", 64, 64, 15, 0.2, 0,
                                                        True, images, labels)["result"][0]
    return (demo[0], clf, demo[2], demo[3])


def test_resampled_method_is_read_by_the_stock_loader_and_resumes_bit_for_bit(comfy, sharper):
    out = train(comfy, sharper, "test_rs_straight", iterations=4, **RESAMPLED)
    report = out["result"][1]
    assert "resampled own images: 60 drawn" in report and "1 corrections" in report
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    log = json.loads((loras / "test_rs_straight.training.json").read_text())
    assert log["summary"]["method"] == "resampled own images" and log["summary"]["settings"]["method"] == "resampled"
    assert [r["iteration"] for r in log["summary"]["rounds"]] == [2]
    assert all("denoise" in r for r in log["iterations"][1:]) and out["result"][2].shape[-1] == 3
    model, _, pos, neg = sharper
    stock = comfy.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(model, "test_rs_straight.safetensors",
                                                                                   1.0)[0]
    sd = comfy_utils.load_torch_file(str(loras / "test_rs_straight.safetensors"))
    assert len(stock.patches) == sum(k.endswith(".lora_up.weight") for k in sd) > 0
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))  # it trained

    previous = comfy_utils.PROGRESS_BAR_HOOK

    def cancel_at_two(value, total, preview, node_id=None):
        if value == 2 and total == 4:  # the training's bar (the drawing's counts the 60 images)
            mm.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(cancel_at_two)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(comfy, sharper, "test_rs_resumed", iterations=4, **RESAMPLED)
    finally:
        mm.interrupt_current_processing(False)
        comfy_utils.set_progress_bar_global_hook(previous)
    resumed = train(comfy, sharper, "test_rs_resumed", iterations=4, resume=True, **RESAMPLED)
    assert "resumed at 2" in resumed["result"][1] and "resampled own images: 60 drawn" in resumed["result"][1]
    a = comfy_utils.load_torch_file(str(loras / "test_rs_straight.safetensors"))
    b = comfy_utils.load_torch_file(str(loras / "test_rs_resumed.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="SpellFairLoRATrainer: .*other settings .*own_images"):
        train(comfy, sharper, "test_rs_resumed", iterations=6, resume=True, **{**RESAMPLED, "own_images": 80})


def test_resampled_method_moves_the_prompts_classes_toward_the_target(comfy, sharper):
    out = train(comfy, sharper, "test_rs_works", iterations=40, every=40,
                validation_seeds=128, learning_rate=3e-3,
                **{**RESAMPLED, "own_images": 200, "batch_size": 32, "steps": 4, "rounds": 1})
    log = json.loads((Path(folder_paths.get_folder_paths("loras")[0]) / "test_rs_works.training.json").read_text())
    before, after = log["iterations"][0]["validation_share"], log["iterations"][-1]["validation_share"]
    # the same 128 seeds before and after: the LoRA draws more sevens and fewer other digits than the frozen model
    assert after[7] > before[7] + 0.1, (before, after, out["result"][1])
    assert 1 - after[1] - after[7] < 1 - before[1] - before[7] - 0.1, (before, after)


def test_resampled_method_refuses_what_it_cannot_train(comfy, sharper):
    model, clf, pos, neg = sharper
    with pytest.raises(ValueError, match="SpellFairLoRATrainer: method 'resampled own images' trains one prompt; "
                                         "positive holds 2"):
        train(comfy, sharper, "test_rs_two", positive=pos + pos, **RESAMPLED)
    with pytest.raises(ValueError, match="SpellFairLoRATrainer: no image is read as class .* draw more images of the "
                                         "prompt \\(own_images\\)"):
        train(comfy, sharper, "test_rs_few", **{**RESAMPLED, "own_images": 10})
    with pytest.raises(ValueError, match="SpellFairLoRATrainer: method must be one of distributional alignment, "
                                         "resampled own images"):
        train(comfy, sharper, "test_rs_bad", method="resample")
