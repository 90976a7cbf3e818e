"""Prompt templates of the Hugging Face model families (what `tokenizer.prompt_ids` expands).

A module of its own, free of heavy imports, so that `models.families` (imported by GPU code
paths, which lack tfds) can name them.
"""

# LLaVA-1.5's prompt for short-answer VQA benchmarks (VQAv2, GQA).
LLAVA_PROMPT = ('USER: <image>\n{question}\nAnswer the question using a single word or '
                'phrase. ASSISTANT:')
# LLaVA-1.5's plain conversation turn (free-form answers), as in its model card.
LLAVA_CHAT_PROMPT = 'USER: <image>\n{question} ASSISTANT:'
# Qwen2.5-VL-Instruct's chat template rendered for one user turn holding an image then the text,
# with its default system prompt and the assistant turn opened (`apply_chat_template(...,
# add_generation_prompt=True)`); the image is `<|vision_start|><|image_pad|><|vision_end|>`.
QWEN_CHAT_PROMPT = ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
                    '<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n')
# The same with LLaVA-1.5's short-answer instruction on a new line after the question, in the
# user's text (as if the user had typed both).
QWEN_VQA_PROMPT = QWEN_CHAT_PROMPT.replace(
    '{question}', '{question}\nAnswer the question using a single word or phrase.')
