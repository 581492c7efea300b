#!/usr/bin/env python3
"""Write bursar's built-in price subset from LiteLLM's price file.

Usage (from the repository root, Python 3 standard library only):

    python3 core/data/make-builtin-subset.py \
        [../shared/data/litellm-model-prices.json] [core/data/builtin-litellm-subset.json]

The output keeps LiteLLM's own format (`model_prices_and_context_window.json`), so
`bursar_core::pricing::builtin_table()` reads it with the same importer that users run on the
full file. Entries are copied verbatim, except the few listed in ALIASES below.

The model list is curated by hand: the current major models of OpenAI, Anthropic, Google,
Mistral and DeepSeek under the names clients actually send. Local models (ollama) are added in
Rust at zero price, not here.

ALIASES: the LiteLLM snapshot this subset is built from no longer carries Anthropic's direct
entries for Claude 3.x and 4.0/4.1 under their common names. For those we copy the entry of the
same model from another provider whose prices equal Anthropic's published list prices (checked
when this list was written), set `litellm_provider` to "anthropic" and record where the entry
came from in `bursar_copied_from` (an extra key the importer ignores).

The script fails (exit status 1) if a listed model is missing or not token-priced, so a newer
LiteLLM file cannot silently shrink the built-in table.
"""

import json
import sys

# Entries copied verbatim, by provider.
MODELS = [
    # --- OpenAI
    "gpt-4o",
    "gpt-4o-2024-11-20",
    "gpt-4o-2024-08-06",
    "gpt-4o-mini",
    "gpt-4o-mini-2024-07-18",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o1",
    "o1-pro",
    "o3",
    "o3-mini",
    "o3-pro",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-5-pro",
    "gpt-5-codex",
    "gpt-5.1",
    "gpt-5.2",
    "gpt-5.4",
    "gpt-5.4-mini",
    "gpt-5.4-nano",
    "gpt-5.5",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
    # --- Anthropic (direct entries)
    "claude-opus-4-8",
    "claude-opus-4-7",
    "claude-opus-4-6",
    "claude-opus-4-5",
    "claude-opus-4-5-20251101",
    "claude-sonnet-4-6",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
    "claude-sonnet-5",
    "claude-opus-5",
    # --- Google (bare names: Vertex AI; gemini/ prefix: Google AI Studio)
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini/gemini-2.5-pro",
    "gemini/gemini-2.5-flash",
    "gemini/gemini-2.5-flash-lite",
    "gemini-3.1-pro-preview",
    "gemini-3.5-flash",
    "gemini/gemini-3.1-pro-preview",
    "gemini/gemini-3.5-flash",
    # --- Mistral
    "mistral/mistral-large-latest",
    "mistral/mistral-medium-latest",
    "mistral/mistral-small-latest",
    "mistral/codestral-latest",
    "mistral/open-mistral-nemo",
    "mistral/ministral-8b-latest",
    "mistral/magistral-medium-latest",
    "mistral/devstral-medium-latest",
    "mistral/mistral-embed",
    # --- DeepSeek
    "deepseek-chat",
    "deepseek-reasoner",
    "deepseek/deepseek-chat",
    "deepseek/deepseek-reasoner",
    "deepseek/deepseek-v4-pro",
    "deepseek/deepseek-v4-flash",
]

# Common Anthropic name -> LiteLLM entry with the same model at Anthropic's list price.
ALIASES = {
    "claude-opus-4-1": "anthropic.claude-opus-4-1-20250805-v1:0",
    "claude-opus-4-1-20250805": "anthropic.claude-opus-4-1-20250805-v1:0",
    "claude-opus-4-0": "anthropic.claude-opus-4-20250514-v1:0",
    "claude-opus-4-20250514": "anthropic.claude-opus-4-20250514-v1:0",
    "claude-sonnet-4-0": "anthropic.claude-sonnet-4-20250514-v1:0",
    "claude-sonnet-4-20250514": "anthropic.claude-sonnet-4-20250514-v1:0",
    "claude-3-7-sonnet-latest": "anthropic.claude-3-7-sonnet-20250219-v1:0",
    "claude-3-7-sonnet-20250219": "anthropic.claude-3-7-sonnet-20250219-v1:0",
    "claude-3-5-sonnet-latest": "anthropic.claude-3-5-sonnet-20241022-v2:0",
    "claude-3-5-sonnet-20241022": "anthropic.claude-3-5-sonnet-20241022-v2:0",
    "claude-3-5-haiku-latest": "anthropic.claude-3-5-haiku-20241022-v1:0",
    "claude-3-5-haiku-20241022": "anthropic.claude-3-5-haiku-20241022-v1:0",
    "claude-3-opus-20240229": "anthropic.claude-3-opus-20240229-v1:0",
    "claude-3-haiku-20240307": "vercel_ai_gateway/anthropic/claude-3-haiku",
}

TOKEN_MODES = {"chat", "completion", "responses", "embedding"}


def check(name, entry):
    if not isinstance(entry, dict):
        sys.exit(f"{name}: not an object")
    if entry.get("mode") not in TOKEN_MODES:
        sys.exit(f"{name}: mode {entry.get('mode')!r} is not token-priced")
    if not isinstance(entry.get("input_cost_per_token"), (int, float)):
        sys.exit(f"{name}: no input_cost_per_token")


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/litellm-model-prices.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "core/data/builtin-litellm-subset.json"
    with open(src, encoding="utf-8") as f:
        full = json.load(f)
    out = {}
    for name in MODELS:
        if name not in full:
            sys.exit(f"{name}: missing from {src}")
        check(name, full[name])
        out[name] = full[name]
    for name, source in ALIASES.items():
        if source not in full:
            sys.exit(f"{name}: alias source {source} missing from {src}")
        check(source, full[source])
        entry = dict(full[source])
        entry["litellm_provider"] = "anthropic"
        entry["bursar_copied_from"] = source
        out[name] = entry
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(out)} models to {dst}")


if __name__ == "__main__":
    main()
