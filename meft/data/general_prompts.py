"""General prompts: what a fine-tune on facts should leave alone, for the trade-off probe's agreement score.

`GENERAL_PROMPTS` are 48 built-in prompts that are not world facts -- instructions, prose to continue, code,
arithmetic and everyday advice -- asked through the chat template as the quick start asks its questions.
`meft.agreement` scores how often a fine-tuned model's next-token choice (teacher-forced top-1) agrees with
the base model's own greedy continuation of each one (1.0 = untouched). None of them is background text for
the sparse update (`meft.data.background`: pydoc prose and world-fact questions), none names a country, and
none is one of the probe's free prompts (`meft.data.retention.FREE_PROMPTS`), so the score measures the
general behaviour no option was tuned on.
"""

from __future__ import annotations

__all__ = ["GENERAL_PROMPTS", "GENERAL_MAX_NEW_TOKENS"]

GENERAL_MAX_NEW_TOKENS = 24  # the base model's continuation scored per prompt (about one sentence)

GENERAL_PROMPTS = (
    # instructions
    "Write one sentence about the mountains.",
    "Explain what a rainbow is to a child.",
    "Describe a quiet morning in a small village.",
    "Write a short poem about autumn leaves.",
    "Give three tips for a good night's sleep.",
    "Summarize the plot of a story about a lost dog who finds its way home.",
    "Write a polite email asking a colleague to reschedule a meeting.",
    "List four fruits that are rich in vitamin C.",
    "Explain why the sky looks blue during the day.",
    "Suggest a name for a friendly robot.",
    "Write a thank-you note to a teacher.",
    "Describe the smell of fresh bread.",
    # prose to continue
    "Continue the story: The old lighthouse keeper climbed the stairs one last time and",
    "Continue the sentence: On rainy afternoons, the children liked to",
    "Finish this paragraph: Learning to ride a bicycle takes patience, because",
    "Continue: The train slowed down as it approached the station, and",
    "Complete the thought: A good friend is someone who",
    "Continue the description: The forest at night was",
    # code
    "Write a Python function that returns the square of a number.",
    "Explain what a for loop does in programming.",
    "Write a Python list comprehension that keeps the even numbers of a list.",
    "What does the len() function do in Python?",
    "Write a short JavaScript function that adds two numbers.",
    "Explain the difference between a list and a tuple in Python.",
    "How do you open a file for reading in Python?",
    "Write a SQL query that selects all rows from a table named users.",
    # arithmetic and reasoning
    "What is 12 plus 7?",
    "What is 9 times 8?",
    "If I have 5 apples and eat 2, how many are left?",
    "What is half of 50?",
    "Count from one to five in words.",
    "Which is larger, 0.5 or 0.25?",
    "A train travels 60 kilometers in one hour. How far does it travel in three hours?",
    "What comes next in the sequence 2, 4, 6, 8?",
    # everyday knowledge and advice
    "How do I make a cup of tea?",
    "What should I pack for a day at the beach?",
    "Give me an idea for a weekend hobby.",
    "How can I keep my plants healthy indoors?",
    "What are some ways to save energy at home?",
    "Why is it important to drink water?",
    "How do bees help flowers?",
    "What is a good way to start learning to cook?",
    "Explain what a calendar is used for.",
    "Describe how to tie a shoelace.",
    "What are the four seasons of the year?",
    "Why do we brush our teeth?",
    "What makes a good birthday party?",
    "Write a sentence using the word 'gentle'.",
)
