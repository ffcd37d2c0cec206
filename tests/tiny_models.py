"""Tiny models built inside the tests (nothing downloaded): a word-level tokenizer over "w0 w1 ..." and a random
Llama whose LM head is scaled so that logits have a std of ~2 (peaked, not degenerate, like a trained model)."""
import math

import torch

VOCAB = 96


def word_tokenizer(vocab: int = VOCAB, chat_template=None):
    """<pad>=0, <s>=1, </s>=2, <unk>=3, then w0 ... w{vocab-5}; whitespace-split."""
    from tokenizers import Tokenizer, models as tkmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tk = Tokenizer(tkmodels.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def tiny_llama(vocab: int = VOCAB, *, seed: int = 0, eos_boost: float = 1.0):
    """A 2-layer, hidden-32 random Llama (torch.manual_seed(seed) first); eos_boost scales the EOS row of the LM
    head (e.g. 2.0 makes samples stop within ~10 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=2, bos_token_id=1, pad_token_id=0))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 2.0 / math.sqrt(32))
        if eos_boost != 1.0:
            model.lm_head.weight[2] *= eos_boost
    return model.eval()
