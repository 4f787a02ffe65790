"""QLoRA: LoRA beside a frozen int8 base. The unmerged layer (x W + scale (x A) B) gives the
merged one's logits and, over an int8 base, the gradients of A and B that the merged path gives
on the dequantized base; the trainer keeps the base int8; `python -m train.finetune
--quantize-base int8` on a 2x4 mesh writes adapters that load on the float and the int8 base,
evaluate as the run did, and export to PEFT; what cannot work is refused in one line."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax
from mistral_jax.arch import configs
from mistral_jax.base import trees
from mistral_jax.io import lora
from mistral_jax.model import registry
from mistral_jax.nn import layers as L
from mistral_jax.quant import int8 as quant
from train import finetune, merge_lora
from train.input import default
from train.run import flags, loop

ROOT = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(1, 64, (2, 12)).astype(np.int32)
CONFIGS = {
    "mistral": configs.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, sliding_window=None),
    "gpt2": configs.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
TARGETS = {"mistral": ["q", "k", "v", "o", "gate", "up", "down"],
           "gpt2": ["q", "v", "o", "fc", "proj"]}
SCALE = 1.5


def normal(rng, shape, scale=1.0):
    """Test data from numpy's generator: jax.random.normal would compile a program per shape."""
    return jnp.asarray(np.float32(scale) * rng.standard_normal(shape, np.float32))


def random_model(config, seed):
    """`mistral_jax.init`'s model (normal(0, 0.02) weights, unit norms) with numpy's draws: the
    claims here are about the adapters, whatever the base's random weights are."""
    model = registry.abstract(config)
    rng = np.random.default_rng(seed)
    return trees.with_weights(model, trees.unflatten({
        name: jnp.ones(x.shape, x.dtype) if name.endswith(("norm", "_scale"))
        else normal(rng, x.shape, config.initializer_range)
        for name, x in trees.flatten(trees.weights(model)).items()}))


def adapters_for(model, targets, seed=0):
    """Adapters with A and B both random, as if trained (lora.init's shapes and A's scale)."""
    rng, weights = np.random.default_rng(seed + 1), trees.weights(model)
    adapters = {}
    for name in targets:
        w = weights["layers"][name]  # (an int8 weight: {"values", "scale"})
        a, b = lora.shapes(name, (w["values"] if isinstance(w, dict) else w).shape, 3)
        adapters[name] = {"a": normal(rng, a, 1 / np.sqrt(np.prod(a[1:-1]))),
                          "b": normal(rng, b, 0.3)}
    return {"layers": adapters}


def merged(model, adapters):
    return trees.with_weights(model, lora.merge(trees.weights(model), adapters, SCALE))


@pytest.mark.parametrize("kind", ["mistral", "gpt2"])
def test_unmerged_forward_and_decoding_equal_the_merged_ones_on_a_float_base(kind):
    model = random_model(CONFIGS[kind], seed=1)
    adapters = adapters_for(model, TARGETS[kind])
    beside = lora.attach(model, adapters, SCALE)
    expected = mistral_jax.forward(merged(model, adapters), IDS)
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(beside, IDS)),
                               np.asarray(expected), atol=1e-5)
    assert np.abs(np.asarray(expected - mistral_jax.forward(model, IDS))).max() > 0.1
    # the decode step (on a CPU: the kernel reading each layer in place, the adapters beside)
    np.testing.assert_array_equal(
        mistral_jax.generate_tokens(beside, IDS, max_new_tokens=5),
        mistral_jax.generate_tokens(merged(model, adapters), IDS, max_new_tokens=5))


def test_an_adapter_per_row_gives_each_row_its_own_adapter():
    """The layer takes A [b, *in, r] and B [b, r, *out] as well: several adapters in a batch."""
    rng = np.random.default_rng(0)
    x, w = normal(rng, (3, 5, 8)), normal(rng, (8, 2, 4))
    a, b = normal(rng, (3, 8, 2)), normal(rng, (3, 2, 2, 4))

    @jax.jit  # one program for the batch and each row alone, not one per eager op
    def together_and_alone():
        return (L.project("btd,dnh->btnh", x, L.Adapted(w, a, b, 0.5)),
                [L.project("btd,dnh->btnh", x[i:i + 1], L.Adapted(w, a[i], b[i], 0.5))
                 for i in range(3)])

    together, alone = together_and_alone()
    for i in range(3):
        np.testing.assert_allclose(together[i:i + 1], alone[i], atol=1e-5)


@pytest.mark.parametrize("rows", [(2, 3), (8, 8)])  # fewer rows than inputs, and more
@pytest.mark.parametrize("equation, shape, group", [
    ("btd,dnh->btnh", (16, 4, 8), None), ("btd,dnh->btnh", (16, 4, 8), 8),
    ("btnh,nhd->btd", (4, 8, 16), None), ("btd,vd->btv", (24, 16), None),
    ("btd,vd->btv", (24, 16), 4)])
def test_the_int8_matmul_differentiates_in_x_as_its_dequantized_weight(equation, shape, group,
                                                                        rows):
    """XLA's dequantizing matmul and its own backward pass (no float copy of the weight kept
    for it) give the float weight's product and dx, per column or per group of inputs, with
    the scales on the output (few rows) or on the weight (many)."""
    layout = "nk" if equation.endswith("->btv") else "kn"
    n_in = 2 if equation.startswith("btnh") else 1
    rng = np.random.default_rng(1)
    weight = normal(rng, shape)
    x = normal(rng, (*rows, *(shape[:n_in] if layout == "kn" else shape[1:])))
    out = normal(rng, jax.eval_shape(lambda: jnp.einsum(equation, x, weight)).shape)

    @jax.jit  # one program per case, as a jitted train step runs it, not one per eager op
    def products_and_grads(weight, x, out):
        values, scale = quant.quantize(weight, 0, n_in, layout, group)
        w = quant.dequantize(values, scale, 0, n_in, layout)
        int8 = lambda x: quant.project(equation, x, quant.QWeight(values, scale), kernel=False)  # noqa: E731
        on_float = lambda x: jnp.einsum(equation, x, w)  # noqa: E731
        grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * out))(x)  # noqa: E731
        return int8(x), on_float(x), grad(int8), grad(on_float)

    got, want, got_dx, want_dx = products_and_grads(weight, x, out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mistral", "gpt2"])
def test_qlora_gradients_equal_the_merged_paths_on_the_dequantized_base(kind):
    base = quant.quantized(random_model(CONFIGS[kind], seed=1))
    float_base = quant.dequantized(base)
    adapters = adapters_for(base, TARGETS[kind])
    frozen, template = trees.weights(base), lora.attach(base, adapters, SCALE)

    def qlora(adapters):
        return trees.with_weights(template, lora.beside(adapters, frozen)).loss(IDS)

    def on_float(adapters):
        return merged(float_base, adapters).loss(IDS)

    # one jitted program for both paths (as the train step is jitted), not one per eager op
    (got_loss, got), (want_loss, want) = jax.jit(
        lambda a: (jax.value_and_grad(qlora)(a), jax.value_and_grad(on_float)(a)))(adapters)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, g in trees.flatten(got).items():
        assert g.dtype == jnp.float32, name
        w = trees.flatten(want)[name]
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name)


# The flags of the QLoRA run (qlora_run) and of the step test_the_trainer_... takes: one compiled
# train step for both (the compilation cache, which the run's subprocess shares), not two.
RUN = ["--lora-rank", "4", "--lora-targets", "q,v,o,down", "--quantize-base", "int8", "--mesh",
       "2x4", "--steps", "3", "--seq-len", "64", "--batch-size", "8", "--lr", "1e-2", "--dtype",
       "bfloat16"]


def test_the_trainer_keeps_the_base_int8_and_trains_float32_adapters(tmp_path):
    """Even under bfloat16 compute: the compute copy is cast inside the step."""
    args = flags.with_defaults(flags.parser("finetune", None).parse_args([
        "--init", str(small_checkpoint(tmp_path)), *RUN, "--out", str(tmp_path / "run")]))
    flags.check(args)
    setup = loop.set_up(args)
    with jax.set_mesh(setup.mesh):
        trainer = loop.Trainer(args, setup, setup.mesh, jnp.bfloat16, 1.0)
        frozen = trees.flatten(trainer.frozen)
        for name in quant.table(setup.config):
            if name + ".values" in frozen:
                assert frozen[name + ".values"].dtype == jnp.int8, name
                assert frozen[name + ".scale"].dtype == jnp.float32, name
                assert name not in frozen
        assert frozen["layers.attn_norm"].dtype == jnp.float32
        int8 = sum(x.nbytes for x in frozen.values() if x.dtype == jnp.int8)
        assert sum(x.nbytes for x in frozen.values()) - int8 < int8 / 4  # scales, norms
        batches = loop.D.Batches(setup.rows, batch_size=8, grad_accum=1, seed=0,
                                 mesh=setup.mesh)
        state, metrics = trainer.train_step(trainer.state, trainer.frozen, next(batches))
    assert np.isfinite(float(metrics["loss"]))
    assert set(trees.flatten(state.params)) == {f"layers.{t}.{p}"
                                                for t in ("q", "v", "o", "down") for p in "ab"}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 1]
    assert all(x.dtype == jnp.float32 for x in (*jax.tree.leaves(state.params), *moments))
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {
        jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)}  # the base was not donated nor changed


def small_checkpoint(tmp_path):
    """A checkpoint of a tiny Mistral with the default run's tokenizer."""
    config = configs.MistralConfig(vocab_size=default.VOCAB, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=4,
                                   sliding_window=None, bos_token_id=1, eos_token_id=2)
    path = tmp_path / "base"
    mistral_jax.save(mistral_jax.init(config, seed=0, tokenizer=default.tokenizer()), path)
    return path


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """`python -m train.finetune --quantize-base int8` as a user types it, on a 2x4 mesh of
    fake CPU devices, over the float checkpoint `base`; and `base` quantized, as `int8`."""
    d = tmp_path_factory.mktemp("qlora")
    base = small_checkpoint(d)
    mistral_jax.save(quant.quantized(mistral_jax.load(base)), d / "int8")
    (d / "eval.txt").write_text(default.CORPUS.read_text()[20000:24000])
    command = [sys.executable, "-m", "train.finetune", "--init", str(base), *RUN,
               "--eval-data", str(d / "eval.txt"), "--eval-every", "3", "--out", str(d / "run")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return d


def test_a_qlora_run_writes_adapters_that_load_evaluate_and_export(qlora_run, capsys):
    import peft
    import torch
    import transformers

    from convert import to_torch
    from train import eval as eval_cli
    from train.run import report

    d = qlora_run
    rows = report.read_metrics(d / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    info = json.loads((d / "run" / "adapters" / "adapter_config.json").read_text())
    assert info["base_quantize"] == "int8" and info["base"] == str(d / "base")
    assert json.loads((d / "run" / "run.json").read_text())["quantize_base"] == "int8"
    # on the int8 base the adapters run beside it, as in the run (bfloat16, on its mesh): its
    # eval loss again
    assert eval_cli.main([str(d / "int8"), "--adapters", str(d / "run" / "adapters"),
                          "--data", str(d / "eval.txt"), "--mesh", "2x4"]) == 0
    loss = float(capsys.readouterr().out.split(",")[0].removeprefix("loss "))
    assert f"{loss:.4f}" == f"{[r for r in rows if 'eval_loss' in r][-1]['eval_loss']:.4f}"
    on_int8 = mistral_jax.load(d / "int8", adapters=d / "run" / "adapters")
    assert on_int8.layers.q.values[...].dtype == jnp.int8
    on_float = mistral_jax.load(d / "base", adapters=d / "run" / "adapters")  # merged
    base = mistral_jax.load(d / "base")
    assert not np.allclose(on_float.layers.q[...], base.layers.q[...])
    ids = IDS[:, :8]
    logits = np.asarray(mistral_jax.forward(on_float, ids))
    np.testing.assert_allclose(np.asarray(mistral_jax.forward(on_int8, ids)), logits, atol=0.05)
    # decoding on the int8 base (the CPU kernel, the adapters beside) as on its float copy
    reference = lora.apply(quant.dequantized(mistral_jax.load(d / "int8")),
                           d / "run" / "adapters")  # (merged)
    np.testing.assert_array_equal(mistral_jax.generate_tokens(on_int8, ids, max_new_tokens=6),
                                  mistral_jax.generate_tokens(reference, ids, max_new_tokens=6))
    # PEFT: the export loads onto the float base exported, with our logits
    assert to_torch.main([str(d / "base"), str(d / "hf")]) == 0
    assert to_torch.main([str(d / "run" / "adapters"), str(d / "peft")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf").eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, d / "peft").eval()(torch.tensor(ids)).logits
    np.testing.assert_allclose(theirs.numpy(), logits, atol=1e-4)


def test_what_cannot_work_is_refused_in_one_line(qlora_run, tmp_path, capsys):
    d, adapters = qlora_run, str(qlora_run / "run" / "adapters")

    def refused(main, argv, *said):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(s in err for s in said), err

    refused(finetune.main, ["--init", str(d / "base"), "--quantize-base", "int8", "--out",
                            str(tmp_path / "a")], "--quantize-base int8 needs --lora-rank")
    refused(finetune.main, ["--init", str(d / "int8"), "--lora-rank", "2", "--merge-lora",
                            "--out", str(tmp_path / "b")], "--merge-lora", "holds int8 weights")
    # --resume refuses another base: the run quantized it, this one would not
    unquantized = [a for a in RUN if a not in ("--quantize-base", "int8")]
    refused(finetune.main, ["--init", str(d / "base"), *unquantized, "--eval-data",
                            str(d / "eval.txt"), "--eval-every", "3", "--out", str(d / "run"),
                            "--resume"], "quantize_base: 'int8' there, None now")
    # merging into the int8 base: refused, naming the float base the run quantized
    refused(merge_lora.main, [str(d / "int8"), adapters, str(tmp_path / "m")],
            "holds int8 weights", f"python -m train.merge_lora {d / 'base'} {adapters}")
    assert not (tmp_path / "m").exists()
    with pytest.raises(mistral_jax.CheckpointError, match="adapters beside its weights"):
        mistral_jax.save(mistral_jax.load(d / "int8", adapters=adapters), tmp_path / "s")
    assert merge_lora.main([str(d / "base"), adapters, str(tmp_path / "merged")]) == 0
