"""Synthetic knowledge corpora for continual pre-training experiments: biographies of fictional people (new
knowledge) and of known people with revised attributes, long-tailed frequencies, held-out query probes and
clean/corrupted prompt pairs for circuit discovery. Everything is seeded and reproducible."""
from jax_controlllm.knowledge.corpus import (
                                             CorpusConfig,
                                             Query,
                                             biography,
                                             build_knowledge_dataset,
                                             documents,
                                             load_entities,
                                             queries,
                                             read_jsonl,
                                             write_corpus_jsonl,
                                             write_probes_jsonl,
)
from jax_controlllm.knowledge.entities import Entity, EntityConfig, generate_entities, long_tail_frequencies
from jax_controlllm.knowledge.pairs import PromptPairs, as_encoder, make_prompt_pairs
from jax_controlllm.knowledge.templates import ATTRIBUTES, QUERIES
from jax_controlllm.knowledge.tokenizer import BOS_ID, PAD_ID, build_word_tokenizer, save_word_tokenizer

__all__ = ["CorpusConfig", "Query", "biography", "build_knowledge_dataset", "documents", "load_entities", "queries",
           "read_jsonl", "write_corpus_jsonl", "write_probes_jsonl", "Entity", "EntityConfig", "generate_entities",
           "long_tail_frequencies", "PromptPairs", "as_encoder", "make_prompt_pairs", "ATTRIBUTES", "QUERIES",
           "BOS_ID", "PAD_ID", "build_word_tokenizer", "save_word_tokenizer"]
