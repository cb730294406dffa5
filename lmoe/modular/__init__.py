"""Skills as experts: compose LoRA adapters into a mixture, add, remove, freeze and replace experts,
start a router from the experts themselves, and merge or export a mixture back to one LoRA."""
