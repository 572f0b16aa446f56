"""A tiny random-weight Llama with its own byte-level BPE tokenizer and chat template, made on the spot.

Nothing is fetched from a hub: the tokenizer is trained on a few built-in lines, the weights are
random (seeded), so vLLM's greedy answers are gibberish but deterministic, which is all the suite
compares. Needs ``transformers``, ``tokenizers`` and ``torch`` (the vLLM environment has them).
"""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "How much energy does one chat answer use? It depends on the batch the request shares.",
    "Energy per token falls as the batch grows, because the weights are read once per step.",
    "The gateway splits the GPU's measured energy among the requests that shared it.",
    "Grams of CO2e and millilitres of water follow from the grid, the PUE and the site's water use.",
    "What is PUE? The facility's energy over the IT equipment's energy.",
    "user assistant system: 0123456789 , . ? ! ' \" ( ) [ ] { } - _ / : ;",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build(path: Path, seed: int = 0) -> Path:
    """Write the model and tokenizer into ``path`` (created); return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=430, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path
