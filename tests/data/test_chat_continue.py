"""A prompt that ends inside a partial assistant turn (`"continue": true`): ChatML and a
model's own chat template (equal to `transformers`' `continue_final_message`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest
import real_models
import transformers

from wakea_jax.data import chat, train_tokenizer
from wakea_jax.data.tokenizer import DEFAULT_CORPUS_PATH, HFTokenizer, default_tokenizer

PROMPT = [{"role": "system", "content": "Solve step by step."},
          {"role": "user", "content": "Solve 3x + 1 = 10."}]
PARTIAL = {"role": "assistant", "content": "Step 1: 3x = 9\n", "continue": True}


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def tok(request, tmp_path_factory):
  if request.param == "sentencepiece":
    return default_tokenizer()
  out_dir = tmp_path_factory.mktemp("continue_hf_tok")
  return HFTokenizer(train_tokenizer.train_bytelevel_bpe([DEFAULT_CORPUS_PATH], out_dir, 700))


def test_chatml_stops_right_after_the_content(tok):
  rendered = chat.render([*PROMPT, PARTIAL], tok)
  assert rendered.text == ("<|im_start|>system\nSolve step by step.<|im_end|>\n"
                           "<|im_start|>user\nSolve 3x + 1 = 10.<|im_end|>\n"
                           "<|im_start|>assistant\nStep 1: 3x = 9\n")
  # The ids are the complete turn's, minus its end-of-turn token and what follows it: the
  # model continues exactly the text a whole solution is trained on.
  whole = chat.render([*PROMPT, {"role": "assistant", "content": PARTIAL["content"]}], tok)
  n = len(rendered.input_ids)
  assert whole.input_ids[:n].tolist() == rendered.input_ids.tolist()
  assert tok.decode(whole.input_ids[n:].tolist()) == "<|im_end|>\n"
  # An empty partial turn is the generation prompt.
  empty = chat.render([*PROMPT, {**PARTIAL, "content": ""}], tok)
  assert empty.input_ids.tolist() == chat.render(PROMPT, tok,
                                                 add_generation_prompt=True).input_ids.tolist()
  # continue: false is an ordinary (complete) assistant message.
  assert chat.render_text([*PROMPT, {**PARTIAL, "continue": False}]) == whole.text


@pytest.mark.parametrize("kind, name", [("qwen2_5", None), ("llama3", "llama3_1")])
def test_own_template_equals_transformers_continue_final_message(tmp_path, kind, name):
  real_models.build_tokenizer(kind, tmp_path, chat_template_name=name)
  ours, hf_tok = HFTokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
  messages = [*PROMPT, PARTIAL]
  plain = [{k: v for k, v in m.items() if k != "continue"} for m in messages]
  text = hf_tok.apply_chat_template(copy.deepcopy(plain), tokenize=False,
                                    continue_final_message=True)
  rendered = chat.render(messages, ours)
  assert rendered.text == text
  # Qwen keeps the partial turn's text as it is; Llama's template trims message text, so
  # (as in transformers) the prompt ends trimmed.
  assert text.endswith("Step 1: 3x = 9\n" if kind == "qwen2_5" else "Step 1: 3x = 9")
  ids = hf_tok.apply_chat_template(copy.deepcopy(plain), tokenize=True,
                                   continue_final_message=True)
  ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
  assert rendered.input_ids.tolist() == list(ids)


@pytest.mark.parametrize("messages, kwargs, match", [
    ([*PROMPT, PARTIAL], {"add_generation_prompt": True},
     "message 2: field 'continue' ends the prompt inside this assistant turn"),
    ([PROMPT[1], PARTIAL, {"role": "user", "content": "more"}], {},
     "message 1: field 'continue' is only allowed on the last message"),
    ([{**PROMPT[1], "continue": True}], {},
     "message 0: field 'continue' is only allowed on assistant messages"),
    ([PROMPT[1], {**PARTIAL, "continue": "yes"}], {},
     "message 1: field 'continue' must be true or false, got str"),
])
def test_misplaced_continue_is_an_error(messages, kwargs, match):
  with pytest.raises(ValueError, match=match):
    chat.render_text(messages, **kwargs)


def test_a_partial_turn_is_never_a_training_target():
  with pytest.raises(ValueError, match="message 2: field 'continue' marks a partial assistant"):
    chat.validate_training_messages([*PROMPT, PARTIAL])
