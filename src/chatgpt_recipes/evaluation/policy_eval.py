"""A policy before and after RL, on held-out prompts: the reward model's mean score, the KL to the reference and
the answer length, and the summary PPO and RLOO print."""

from contextlib import nullcontext

import torch

from chatgpt_recipes.modeling.generation import zero3_gathered


def policy_change_summary(title: str, prompts: int, before: dict, after: dict, output_dir: str) -> str:
    """What PPO and RLOO print at the end: reward, KL and answer length on held-out prompts, before -> after."""
    return (f"\n=== {title} on {prompts} held-out prompts ===\n"
            f"reward (centred): {before['reward']:+.3f} -> {after['reward']:+.3f}\n"
            f"KL to reference:  {before['kl']:+.3f} -> {after['kl']:+.3f}\n"
            f"answer length:    {before['length']:.1f} -> {after['length']:.1f} tokens\n"
            f"Saved to {output_dir}")


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, tokenizer, prompts: list[str], max_new_tokens: int,
                    temperature: float, seed: int, end_token_id: int) -> dict:
    """Mean centred reward of sampled answers to held-out prompts and the KL to the reference on them (the sum
    over answer tokens of log pi - log pi_ref, the k1 estimator on the policy's own samples). `reference` None
    means the policy is a PEFT model whose reference is the same model with its adapter disabled. An answer ends
    at `end_token_id` (templates.answer_end_token_id: where PPO/RLOO stop and the reward model scores). Every rank runs
    it (under ZeRO-3 the models' weights are gathered for it) and gets the same figures."""
    with zero3_gathered(policy, reference, reward_model):
        return _evaluate_policy(policy, reference, reward_model, tokenizer, prompts, max_new_tokens, temperature, seed,
                                end_token_id)


def _evaluate_policy(policy, reference, reward_model, tokenizer, prompts, max_new_tokens, temperature, seed,
                     end_token_id):
    device = next(policy.parameters()).device
    torch.manual_seed(seed)
    rewards, kls, lengths = [], [], []
    policy.eval()
    for prompt in prompts:
        query = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        output = policy.generate(input_ids=query, attention_mask=torch.ones_like(query), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=end_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = output[:, query.shape[1]:]
        end = (answer[0] == end_token_id).nonzero()
        answer = answer[:, : int(end[0]) + 1] if len(end) else answer
        sequence = torch.cat([query, answer], dim=1)

        def answer_logprobs(model):
            logits = model(input_ids=sequence).logits[:, query.shape[1] - 1:-1].float() / (temperature + 1e-7)
            return torch.log_softmax(logits, -1).gather(-1, answer[..., None]).squeeze(-1).sum()

        with policy.disable_adapter() if reference is None else nullcontext():
            reference_logprob = answer_logprobs(policy if reference is None else reference)
        kls.append((answer_logprobs(policy) - reference_logprob).item())
        rewards.append(reward_model(input_ids=sequence).logits[0, 0].item())
        lengths.append(answer.shape[1])
    policy.train()
    count = len(prompts)
    return {"reward": sum(rewards) / count, "kl": sum(kls) / count, "length": sum(lengths) / count}
