"""
Datasets as conversations for SFT, RL and chat evaluation. See tasks/common.py for the machinery and where data
comes from (env NANOCHAT_LOCAL_DATA, the Hugging Face hub cache, offline mode). The SFT mixture is
scripts/chat_sft.py's SFT_PARTS.
"""
