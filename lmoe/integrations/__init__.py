"""lmoe inside other tools: a PEFT method (peft_tuner), the Hugging Face Trainer (hf_trainer), and
lm-eval's tasks (lm_eval_tasks)."""
