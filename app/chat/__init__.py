"""Chat with the tuned model: OpenAI's `/v1/chat/completions` over the model-serving process."""
