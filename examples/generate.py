"""Load a saved cbq_hf checkpoint and generate an answer with ordinary transformers code.

python examples/generate.py OUT_FOLDER ["your question"]
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import cbq_hf  # noqa: F401  (registers the "cbq" quantization method)

path = sys.argv[1]
question = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France? Answer in one sentence."
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok.apply_chat_template(
    [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)
out = model.generate(**ids, max_new_tokens=48, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
