"""Synthetic multi-turn tool-use conversations in GLM-5's format: SFT data, pretraining text, and the eval task.

    from glm5.train.conversations import TOOLS, make_conversation, make_task
    import random
    conv = make_conversation(random.Random(0))    # {"messages": [...], "tools": [...]}: OpenAI style
    task = make_task(random.Random(1))            # {"messages": [user], "tools": [...], "expected": {name, arguments}}

Three small tools (weather, addition, capital lookup) so a nano model can learn the whole loop on a CPU in
minutes: read the request, reason briefly, emit a well-formed `<tool_call>` with the right arguments copied
from the request, read the `<tool_response>`, answer. Some conversations have a follow-up question (a second
call) and some need no tool at all, so the model also learns when not to call one.
The train and eval splits draw from disjoint user requests (see `split_of`): an eval request's exact wording
and arguments never occur in training, so the task accuracy measures copying arguments out of the request.
Training chats can be drawn `wide=True`: half their cities and countries are made-up names (`made_up_name`)
and half their numbers run to 999, so no memorized value fits a request and the model must copy it, names of
several tokens included. The eval requests keep the narrow lists: real names the model has seen, in requests
it has not. `make demo` trains on the narrow lists (`--wide-args` for the wide ones): once the nano preset's KV
latent was wide enough to carry a token's identity, narrow chats taught it to copy the eval's arguments in the
demo's budget and wide ones did not yet (dev/LOG.md).
"""

from __future__ import annotations

import json
import random
import zlib

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "get_capital", "description": "The capital city of a country.",
     "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}},
]

CITIES = ["Oslo", "Paris", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Rome", "Delhi", "Seoul", "Quito",
          "Dublin", "Vienna", "Prague", "Lisbon", "Nairobi", "Sydney", "Toronto", "Chicago", "Boston"]
CAPITALS = {"France": "Paris", "Norway": "Oslo", "Peru": "Lima", "Egypt": "Cairo", "Japan": "Tokyo",
            "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "India": "New Delhi", "Kenya": "Nairobi",
            "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin", "Chile": "Santiago", "Cuba": "Havana"}
SKIES = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]

WEATHER_ASKS = ["What is the weather in {city}?", "How is the weather in {city} today?", "Weather in {city}?",
                "Is it cold in {city} right now?", "Tell me the weather for {city}."]
ADD_ASKS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What do {a} and {b} sum to?"]
CAPITAL_ASKS = ["What is the capital of {country}?", "Which city is the capital of {country}?",
                "Capital of {country}?"]
FOLLOW_UPS = {"get_weather": "And in {city}?", "add": "Now add {a} and {b}.", "get_capital": "And of {country}?"}
ASKS = {"get_weather": WEATHER_ASKS, "add": ADD_ASKS, "get_capital": CAPITAL_ASKS}
FOLLOW_UP_ASKS = {name: [text] for name, text in FOLLOW_UPS.items()}
CHITCHAT = [("Hi!", "Hello! How can I help you today?"), ("Thanks.", "You are welcome."),
            ("Who are you?", "I am a small GLM-5 model trained on a CPU."),
            ("Good morning.", "Good morning! What can I do for you?")]


SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "to", "su", "bel", "dor", "ni", "pa", "zi", "mar", "te", "qua", "len",
             "go", "ash", "ri", "tan", "ol", "bu", "sen", "vi"]


def made_up_name(rng: random.Random) -> str:
    """A pronounceable name that is no real place: 2-3 syllables, capitalized ("Kalomi", "Venrita")."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def capital_of(country: str) -> str:
    """The capital of a real country of CAPITALS, or a made-up one (fixed per name) for a made-up country."""
    if country in CAPITALS:
        return CAPITALS[country]
    rng = random.Random(zlib.crc32(country.encode()))
    return made_up_name(rng) + rng.choice(["", " City", "grad", "ville"])


def split_of(request: str) -> str:
    """"eval" for one user request in ten (a stable hash of its text), "train" for the rest."""
    return "eval" if zlib.crc32(request.encode()) % 10 == 0 else "train"


def _draw_call(rng: random.Random, split: str, name: str | None = None, template: dict | None = None,
               wide: bool = False) -> tuple[str, dict, str]:
    """-> tool name, arguments, and the user's request for it, from the given split; `wide`: half the names
    made up, half the numbers up to 999 (see the module's docstring)."""
    while True:
        tool = name or rng.choice(["get_weather", "add", "get_capital"])
        made_up = wide and rng.random() < 0.5
        if tool == "get_weather":
            arguments = {"city": made_up_name(rng) if made_up else rng.choice(CITIES)}
        elif tool == "add":
            top = 999 if made_up else 99
            arguments = {"a": rng.randint(0, top), "b": rng.randint(0, top)}
        else:
            arguments = {"country": made_up_name(rng) if made_up else rng.choice(sorted(CAPITALS))}
        request = rng.choice((template or ASKS)[tool]).format(**arguments)
        if split_of(request) == split:
            return tool, arguments, request


def run_tool(rng: random.Random, name: str, arguments: dict) -> tuple[dict, str]:
    """-> the tool's JSON result and the assistant's final answer using it."""
    if name == "get_weather":
        temp, sky = rng.randint(-10, 35), rng.choice(SKIES)
        return {"temp_c": temp, "sky": sky}, f"It is {temp} degrees and {sky} in {arguments['city']}."
    if name == "add":
        total = arguments["a"] + arguments["b"]
        return {"result": total}, f"{arguments['a']} plus {arguments['b']} is {total}."
    capital = capital_of(arguments["country"])
    return {"capital": capital}, f"The capital of {arguments['country']} is {capital}."


def _reason(name: str, arguments: dict) -> str:
    described = ", ".join(f"{k} {v}" for k, v in arguments.items())
    return f"The user needs {name} with {described}."


def _tool_turns(rng: random.Random, name: str, arguments: dict, call_id: str) -> list[dict]:
    result, answer = run_tool(rng, name, arguments)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return [
        {"role": "assistant", "reasoning_content": _reason(name, arguments), "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        {"role": "assistant", "reasoning_content": "The tool answered.", "content": answer},
    ]


def make_conversation(rng: random.Random, split: str = "train", wide: bool = False, more_calls: int = 0) -> dict:
    """One conversation: a tool call (maybe with a follow-up call), or small talk without tools.

    more_calls = 0: one follow-up ("And in Oslo?") three times in ten. more_calls = n > 0: 0..n further requests
    after the first, each a follow-up or a new request for any tool: more calls (arguments to copy out of the
    latest request, not an earlier one) per tools block."""
    if rng.random() < 0.15:
        user, reply = rng.choice(CHITCHAT)
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "reasoning_content": "No tool is needed.", "content": reply}],
                "tools": TOOLS}
    name, arguments, request = _draw_call(rng, split, wide=wide)
    messages = [{"role": "user", "content": request}]
    messages += _tool_turns(rng, name, arguments, "call_0")
    extra = (1 if rng.random() < 0.3 else 0) if more_calls <= 0 else rng.randint(0, more_calls)
    for turn in range(1, extra + 1):
        if more_calls <= 0 or rng.random() < 0.3:
            _, more, follow_up = _draw_call(rng, split, name, FOLLOW_UP_ASKS, wide=wide)
        else:
            name, more, follow_up = _draw_call(rng, split, wide=wide)
        messages.append({"role": "user", "content": follow_up})
        messages += _tool_turns(rng, name, more, f"call_{turn}")
    return {"messages": messages, "tools": TOOLS}


def make_task(rng: random.Random, split: str = "eval") -> dict:
    """One eval prompt: a user request whose right answer is one tool call, known exactly."""
    name, arguments, request = _draw_call(rng, split)
    return {"messages": [{"role": "user", "content": request}], "tools": TOOLS,
            "expected": {"name": name, "arguments": arguments}}
