"""Tiny dataset files in the Hub's column schemas: the demo's (experiments/demo_fixtures.py) and the tests' own."""

import sys
import os

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from demo_fixtures import (FRUITS, ORGANS, medmcqa_rows, oasst1_rows, triviaqa_rows, wikitext_rows,  # noqa: E402,F401
                           write_jsonl, write_parquet)


HELLASWAG = [  # Rowan/hellaswag's columns; label is a string on the Hub
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.",
                                                         "is ripping level tiles off.",
                                                         "is holding a rubik's cube.",
                                                         "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx": "A lady walks to a barbell. She bends down and",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "label": "3"},
    {"ind": 106, "activity_label": "Canoeing", "ctx": "Two women in a child are shown in a canoe while a man "
     "pulls the canoe while standing in the water, with other individuals visible in the background. the child "
     "and a different man", "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                                        "are driving the canoe, they go down the river flowing side to side.",
                                        "sit in a canoe while the man paddles.",
                                        "walking go down the rapids, while the man in his helicopter almost falls "
                                        "and goes out of canoehood."], "label": "2"},
    {"ind": 114, "activity_label": "High jump", "ctx": "A boy is running down a track. the boy", "endings": [
        "runs into a car.", "gets in a mat.", "lifts his body above the height of a pole.",
        "stands on his hands and springs."], "label": "2"},
    {"ind": 7, "activity_label": "Fox", "ctx": "The quick brown fox", "endings": ["jumps over the lazy dog.",
                                                                                "is a vitamin.", "sleeps.", "A."],
     "label": "0"},
]
