"""The two generators of self-instruct, one interface: `complete(prompts)` gives one Completion per prompt, sampled
with the same decoding (temperature, top_p, max_new_tokens, stop sequences) from
  - LocalGenerator: any Hugging Face causal LM, the prompts in one padded batch through `generate`;
  - OpenAICompatibleGenerator: an OpenAI-compatible server (OpenAI, vLLM, llama.cpp, TGI ...), /v1/completions
    with the batch of prompts in one request, or /v1/chat/completions one request per prompt, concurrently.
`prompt_style` "completion" continues the prompt text as it is; "chat" sends it as one user message (a local model
gets its chat template)."""

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from chatgpt_recipes.modeling.generation import stop_token_ids
from chatgpt_recipes.modeling.loading import load_for_inference
from chatgpt_recipes.runtime.errors import ConfigError, SelfInstructError

PROMPT_STYLES = ("completion", "chat")
# The request prompt asks for 20 tasks: stop before a 20th, as Alpaca did
STOP_SEQUENCES = ["\n20", "20."]
API_KEY_ENV = "OPENAI_API_KEY"


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of text or a stop sequence) or "length" (max_new_tokens reached)


@dataclass
class Decoding:
    max_new_tokens: int
    temperature: float
    top_p: float


def cut_at_stop(text: str) -> tuple[str, bool]:
    """The text before the first stop sequence (which is not returned, as in the OpenAI API), and whether one was
    found."""
    positions = [text.find(stop) for stop in STOP_SEQUENCES if stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


class LocalGenerator:
    def __init__(self, model_name_or_path: str, dtype: torch.dtype, prompt_style: str, decoding: Decoding,
                 trust_remote_code: bool = False, use_cpu: bool = False):
        self.tokenizer, self.model = load_for_inference(model_name_or_path, trust_remote_code, dtype)
        if torch.cuda.is_available() and not use_cpu:
            self.model.to("cuda")
        self.tokenizer.padding_side = "left"  # new tokens follow every prompt directly
        self.prompt_style, self.decoding = prompt_style, decoding
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.description = f"local model {model_name_or_path} ({dtype}, {prompt_style} prompts)"

    def _model_input(self, prompt: str) -> str:
        if self.prompt_style == "chat":
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    @torch.no_grad()
    def complete(self, prompts: list[str]) -> list[Completion]:
        texts = [self._model_input(prompt) for prompt in prompts]
        has_bos = self.tokenizer.bos_token is not None and texts[0].startswith(self.tokenizer.bos_token)
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True,
                                add_special_tokens=not has_bos).to(self.model.device)
        output = self.model.generate(
            **inputs, do_sample=True, temperature=self.decoding.temperature, top_p=self.decoding.top_p, top_k=0,
            max_new_tokens=self.decoding.max_new_tokens, stop_strings=STOP_SEQUENCES, tokenizer=self.tokenizer,
            eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        completions = []
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            ended = any(token in self.stop_ids for token in row)
            text, stopped = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True))
            completions.append(Completion(text, "stop" if ended or stopped else "length"))
        return completions


class OpenAICompatibleGenerator:
    """Requests with the standard library's HTTP client; the key, if the server wants one, from $OPENAI_API_KEY.
    Connection failures, timeouts, 429 and 5xx answers are retried `max_retries` times with exponential backoff."""

    def __init__(self, api_base: str, api_model: str, prompt_style: str, decoding: Decoding, max_retries: int = 3,
                 timeout: float = 600.0):
        parsed = urllib.parse.urlparse(api_base)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"api_base must be an http(s) URL such as http://localhost:8000/v1, got {api_base!r}")
        if not api_model:
            raise ConfigError("api_model is required with api_base: the model name the server serves")
        self.api_base, self.api_model = api_base.rstrip("/"), api_model
        self.prompt_style, self.decoding = prompt_style, decoding
        self.max_retries, self.timeout = max_retries, timeout
        self.api_key = os.environ.get(API_KEY_ENV)
        endpoint = "completions" if prompt_style == "completion" else "chat/completions"
        self.description = f"{api_model} at {self.api_base}/{endpoint}"

    def _sampling(self) -> dict:
        return {"model": self.api_model, "max_tokens": self.decoding.max_new_tokens,
                "temperature": self.decoding.temperature, "top_p": self.decoding.top_p, "stop": STOP_SEQUENCES}

    def _post(self, path: str, body: dict) -> dict:
        url = f"{self.api_base}/{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        host = urllib.parse.urlparse(url).netloc
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=self.timeout) as reply:
                    text = reply.read().decode("utf-8", "replace")
                break
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:500]
                failure = f"HTTP {error.code} {error.reason}: {detail}"
                if error.code not in (408, 409, 429) and error.code < 500:  # the request itself is wrong: no retry
                    hint = f" (is ${API_KEY_ENV} set?)" if error.code in (401, 403) else ""
                    raise SelfInstructError(f"{url} refused the request: {failure}{hint}") from error
            except urllib.error.URLError as error:
                failure = f"could not connect ({error.reason})"
            except (TimeoutError, ConnectionError) as error:
                failure = f"{type(error).__name__}: {error or 'no answer within ' + str(self.timeout) + ' s'}"
            if attempt == self.max_retries:
                raise SelfInstructError(f"endpoint {host} failed: {failure}, POST {url}, {attempt + 1} "
                                        "attempt(s). Is the server running and api_base right?")
            time.sleep(min(2 ** attempt, 30))
        try:
            answer = json.loads(text)
            choices = answer["choices"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SelfInstructError(f"{url} answered without OpenAI-style 'choices': {text[:300]!r}") from error
        return choices

    def complete(self, prompts: list[str]) -> list[Completion]:
        if self.prompt_style == "completion":
            choices = sorted(self._post("completions", {**self._sampling(), "prompt": prompts}),
                             key=lambda choice: choice.get("index", 0))
            if len(choices) != len(prompts):
                raise SelfInstructError(f"{self.api_base}/completions returned {len(choices)} choices for "
                                        f"{len(prompts)} prompts")
            return [Completion(choice.get("text") or "", choice.get("finish_reason") or "stop") for choice in choices]

        def chat(prompt: str) -> Completion:
            choice = self._post("chat/completions",
                                {**self._sampling(), "messages": [{"role": "user", "content": prompt}]})[0]
            return Completion((choice.get("message") or {}).get("content") or "", choice.get("finish_reason") or "stop")

        with ThreadPoolExecutor(len(prompts)) as pool:  # chat endpoints take one conversation per request
            return list(pool.map(chat, prompts))
