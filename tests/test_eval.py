"""``qoqc eval``: windowed perplexity equals the same computation with transformers."""

from __future__ import annotations

import math

import numpy as np
import torch

from qoq_compiler import compile, load
from qoq_compiler.cli import main
from qoq_compiler.runtime.evaluate import perplexity, wikitext_text
from conftest import DATA, STORIES, hf_model, requires_shared_data

WIKI = DATA / "wikitext-2-raw-v1" / "wiki.test.raw"


def test_wikitext_join_matches_the_hf_rows(tmp_path):
    f = tmp_path / "w.raw"
    f.write_text(" \n = Title = \n \n Body line . \n")
    assert wikitext_text(f) == "\n\n = Title = \n" + "\n\n" + "\n\n" + " Body line . \n"


@requires_shared_data()
def test_perplexity_equals_transformers(tmp_path):
    text = wikitext_text(WIKI)[:20000]
    eng = load(compile(STORIES, target="llvm", quant="fp32", output=tmp_path / "a", progress=False),
                       max_total_tokens=256)
    got = perplexity(eng, text, seq_len=256, max_tokens=1024, progress=False)
    ids = eng.encode(text)[:1024]
    ref = hf_model(STORIES)
    nll = 0.0
    with torch.no_grad():
        for w in range(4):
            x = torch.tensor([ids[w * 256:(w + 1) * 256]])
            nll += float(torch.nn.functional.cross_entropy(ref(x).logits[0, :-1], x[0, 1:], reduction="sum"))
    expected = math.exp(nll / (4 * 255))
    assert got.windows == 4 and got.scored_tokens == 4 * 255
    assert abs(got.perplexity - expected) / expected < 1e-4


@requires_shared_data()
def test_eval_cli_compiles_a_model_and_prints_perplexity(tmp_path, capsys):
    rc = main(["eval", str(STORIES), "--text", str(WIKI), "--wikitext", "--seq-len", "128", "--max-tokens", "512",
               "--quant", "fp32", "--quiet"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("perplexity: ") and np.isfinite(float(last.split()[-1]))
