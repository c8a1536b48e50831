"""Write the small example datasets of examples/finetune/ (deterministic: running it again gives the same files).

    python examples/data/make_data.py

- ``chat.jsonl``: short chats for the text recipes (``lora.py``, ``full.py``): single-turn answers, multi-turn
  conversations, answers with reasoning (``reasoning_content``), a system prompt now and then, and a few tool
  calls with their results (with the ``tools`` they use).
- ``vision_chat.jsonl`` + ``images/*.png``: questions about tiny drawings of coloured shapes, for
  ``multimodal_lora.py``. Image paths are relative to this folder.

The content is written by this script, not taken from anywhere. It is made to be learnable by a tiny model in a few
steps (short, regular answers), not to teach anything.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SEED = 1234

CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
]  # fmt: skip
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("early", "late"), ("happy", "sad"),
             ("light", "dark"), ("open", "closed"), ("up", "down")]  # fmt: skip
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer in one short sentence.", "You are a friendly tutor."]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
CONDITIONS = ["sunny", "cloudy", "rainy", "windy"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def chat_rows(rng: random.Random) -> list[dict]:
    rows = []
    # Single-turn arithmetic, half of them with reasoning.
    for index in range(30):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        reasoning = f"{a} plus {b} is {a + b}." if index % 2 else None
        rows.append({"messages": [user(f"What is {a}+{b}?"), assistant(f"{a}+{b} = {a + b}.", reasoning)]})
    # Capitals, some with a system prompt.
    for index, (country, capital) in enumerate(CAPITALS):
        messages = [user(f"What is the capital of {country}?"), assistant(f"The capital of {country} is {capital}.")]
        if index % 3 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[index % len(SYSTEM_PROMPTS)]})
        rows.append({"messages": messages})
    # Opposites, with reasoning.
    for word, opposite in OPPOSITES:
        rows.append(
            {
                "messages": [
                    user(f"What is the opposite of {word}?"),
                    assistant(
                        f"The opposite of {word} is {opposite}.", f"The word is {word}; its opposite is {opposite}."
                    ),
                ]
            }
        )
    # Multi-turn: the first answer's reasoning is dropped by the template, the last one's is kept.
    for index in range(16):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        rows.append(
            {
                "messages": [
                    user(f"What is {a}+{b}?"),
                    assistant(f"{a}+{b} = {a + b}.", f"{a} plus {b} is {a + b}."),
                    user(f"And times {c}?"),
                    assistant(
                        f"({a}+{b})*{c} = {(a + b) * c}.", f"{a + b} times {c} is {(a + b) * c}." if index % 2 else None
                    ),
                ]
            }
        )
    # Word lengths and letter counts.
    for word in ["cat", "house", "river", "moon", "planet", "tree", "book", "apple"]:
        rows.append(
            {"messages": [user(f"How many letters are in '{word}'?"), assistant(f"'{word}' has {len(word)} letters.")]}
        )
    # Tool calls: call, result, final answer.
    for index, (_, city) in enumerate(CAPITALS[:4]):
        condition, temp = CONDITIONS[index % len(CONDITIONS)], rng.randint(5, 30)
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        rows.append(
            {
                "messages": [
                    user(f"What is the weather in {city}?"),
                    assistant("", "I need the weather tool." if index % 2 else None) | {"tool_calls": [call]},
                    {"role": "tool", "content": json.dumps({"condition": condition, "temp": temp})},
                    assistant(f"It is {condition} in {city}, {temp} degrees."),
                ],
                "tools": [WEATHER_TOOL],
            }
        )
    return rows


COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 200, 20)}
SHAPES = ("square", "circle", "triangle")


def draw(shape: str, colour: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    box = (12, 12, size - 12, size - 12)
    if shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    else:
        pen.polygon([(size // 2, 10), (size - 10, size - 12), (10, size - 12)], fill=COLOURS[colour])
    return image


def vision_rows() -> list[dict]:
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for shape in SHAPES:
        for colour in COLOURS:
            name = f"images/{colour}_{shape}.png"
            draw(shape, colour).save(HERE / name, optimize=True)
            picture = {"type": "image", "image": name}
            rows.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [picture, {"type": "text", "text": f"What colour is the {shape}?"}],
                        },
                        assistant(f"The {shape} is {colour}."),
                    ]
                }
            )
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": [picture, {"type": "text", "text": "What shape is this?"}]},
                        assistant(f"It is a {colour} {shape}."),
                    ]
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    chat = chat_rows(random.Random(SEED))
    vision = vision_rows()
    write_jsonl(HERE / "chat.jsonl", chat)
    write_jsonl(HERE / "vision_chat.jsonl", vision)
    print(
        f"wrote {len(chat)} rows to chat.jsonl, {len(vision)} rows and {len(vision) // 2} images to vision_chat.jsonl"
    )


if __name__ == "__main__":
    main()
