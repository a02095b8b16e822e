"""Sudoku metrics on hand-made grids, standard errors, sweep parsing, and solving with a real sampler."""

from __future__ import annotations

import math

import pytest
import torch

from udmtrain.data import sudoku as S
from udmtrain.eval import sudoku as ev
from udmtrain.registry import PARAMETERIZATION, PROCESS, SAMPLER, SCHEDULE

SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def _swap_rectangle(grid: str, r1: int, r2: int, c1: int, c2: int) -> str:
    g = list(grid)
    for r in (r1, r2):
        g[r * 9 + c1], g[r * 9 + c2] = g[r * 9 + c2], g[r * 9 + c1]
    return "".join(g)


def test_solved_exact_output():
    quiz = SOLUTION[:40] + "0" * 41
    assert ev.grade(quiz, SOLUTION, SOLUTION) == {"exact": 1.0, "solved": 1.0, "valid_grid": 1.0,
                                                  "cell_accuracy": 1.0}


def test_invalid_output():
    quiz = "0" * 40 + SOLUTION[40:]
    bad = "1" + SOLUTION[1:]  # '5' -> '1' in cell 0: row 0 now has two 1s
    g = ev.grade(quiz, SOLUTION, bad)
    assert g == {"exact": 0.0, "solved": 0.0, "valid_grid": 0.0, "cell_accuracy": 39 / 40}
    assert ev.grade(quiz, SOLUTION, "x" * 81)["cell_accuracy"] == 0.0  # undecodable cells are wrong


def test_alternative_solution_of_a_non_unique_puzzle_counts_as_solved():
    # rows 0/1 x columns 0/2 hold 5 4 / 6 2? use a rectangle that stays valid when swapped: find one
    alt = None
    for r1 in range(0, 9, 3):
        for r2 in range(r1 + 1, r1 + 3):
            for c1 in range(9):
                for c2 in range(c1 + 1, 9):
                    cand = _swap_rectangle(SOLUTION, r1, r2, c1, c2)
                    if cand != SOLUTION and S.is_valid_solution(cand):
                        alt, cells = cand, [r1 * 9 + c1, r1 * 9 + c2, r2 * 9 + c1, r2 * 9 + c2]
                        break
                if alt:
                    break
            if alt:
                break
        if alt:
            break
    assert alt is not None
    quiz = "".join("0" if i in cells else ch for i, ch in enumerate(SOLUTION))
    assert S.count_solutions(quiz) == 2  # the rectangle makes the puzzle ambiguous
    g = ev.grade(quiz, SOLUTION, alt)
    assert g == {"exact": 0.0, "solved": 1.0, "valid_grid": 1.0, "cell_accuracy": 0.0}
    # a valid grid that breaks a clue is a valid grid but not a solution
    other = S.make_puzzle(0, 0, 70, 75).solution
    clue_quiz = SOLUTION[:30] + "0" * 51
    g2 = ev.grade(clue_quiz, SOLUTION, other)
    assert g2["valid_grid"] == 1.0 and g2["solved"] == 0.0 and g2["exact"] == 0.0


def test_summary_means_and_standard_errors():
    graded = [{"exact": 1.0, "solved": 1.0, "valid_grid": 1.0, "cell_accuracy": 1.0},
              {"exact": 0.0, "solved": 1.0, "valid_grid": 1.0, "cell_accuracy": 0.5},
              {"exact": 0.0, "solved": 0.0, "valid_grid": 0.0, "cell_accuracy": 0.0},
              {"exact": 0.0, "solved": 0.0, "valid_grid": 1.0, "cell_accuracy": 0.5}]
    s = ev.summarize(graded)
    assert s["num_puzzles"] == 4 and s["solved"] == 0.5 and s["exact"] == 0.25 and s["valid_grid"] == 0.75
    assert s["solved_stderr"] == pytest.approx(math.sqrt(0.25 / 4))
    assert s["cell_accuracy"] == 0.5
    assert s["cell_accuracy_stderr"] == pytest.approx(math.sqrt(((0.5**2) * 2 + 0) / 3) / 2)


def test_sweep_grid_and_sampler_specs():
    grid = ev.sweep_grid(["steps=4,8", "sampler=ancestral,pc_gibbs:k_parallel=4"])
    assert grid == [{"sampler": "ancestral", "steps": 4}, {"sampler": "ancestral", "steps": 8},
                    {"sampler": "pc_gibbs:k_parallel=4", "steps": 4}, {"sampler": "pc_gibbs:k_parallel=4", "steps": 8}]
    assert ev.parse_sampler_spec("pc_gibbs:k_parallel=4")[1] == ["sampler.name=pc_gibbs", "sampler.k_parallel=4"]
    assert ev.parse_sampler_spec("greedy")[1] == ["sampler.temperature=0.0001", "sampler.temperature_on=logits"]
    assert ev.parse_sampler_spec("ancestral:greedy")[1][0] == "sampler.name=ancestral"
    for bad in (["steps=a"], ["sampler=x"], ["foo=1"]):
        with pytest.raises(ValueError):
            ev.sweep_grid(bad)


class SolutionOracle(torch.nn.Module):
    """Logits that put all mass on the stored solution (a perfect solver), for any process."""

    def __init__(self, solutions: torch.Tensor, num_states: int) -> None:
        super().__init__()
        self.solutions, self.num_states = solutions, num_states

    def forward(self, xt_BL, sigma_B, noise_BL=None):
        rows = (xt_BL[:, None, :S.N_CELLS] == self.solutions[None, :, :S.N_CELLS]).all(-1).float().argmax(-1)
        logits = torch.full((*xt_BL.shape, self.num_states), -30.0)
        return logits.scatter(-1, self.solutions[rows, :, None], 30.0)  # the row whose puzzle is clamped


@pytest.mark.parametrize("name,process", [("ancestral", "masked"), ("confidence", "masked"),
                                          ("pc_gibbs", "absorbing_uniform"), ("ancestral", "uniform")])
def test_solve_with_a_perfect_network_and_the_prompt_clamped(name, process):
    puzzles = [S.make_puzzle(1, i, 40, 50) for i in range(6)]
    proc = PROCESS.build(process, vocab_size=S.VOCAB_SIZE)
    cls = SAMPLER.get(name)
    sampler = cls(cls.Config(num_steps=8), schedule=SCHEDULE.build("loglinear"), process=proc,
                  parameterization=PARAMETERIZATION.build("denoiser", process=proc))
    full = torch.stack([torch.from_numpy(S.encode_pair(p)[0]).long() for p in puzzles])
    report = ev.evaluate(sampler, SolutionOracle(full, proc.num_states), puzzles, batch_size=4, seed=0)
    assert report["num_puzzles"] == 6 and report["nfe"] <= 8
    assert report["solved"] == report["exact"] == report["cell_accuracy"] == 1.0
    # the sampler never sees the answer: the tokens handed over are blank outside the prompt
    tokens, prompt = ev.prompt_batch(puzzles)
    assert bool((tokens[~prompt] == 0).all()) and prompt.sum() == 6 * S.PROMPT_LEN


def test_puzzles_from_shards_and_csv(tmp_path):
    from udmtrain.data.prepare import prepare_prompted

    puzzles = [S.make_puzzle(2, i, 45, 55) for i in range(5)]
    prepare_prompted({"valid": (S.encode_pair(p) for p in puzzles)}, "sudoku", S.SEQ_LEN, str(tmp_path / "d"),
                     {"kind": "test"}, samples_per_shard=2, progress=False)
    assert ev.load_puzzles(str(tmp_path / "d"), "valid") == puzzles
    assert ev.load_puzzles(str(tmp_path / "d"), "valid", limit=3) == puzzles[:3]
    S.write_csv(str(tmp_path / "p.csv"), puzzles)
    assert ev.load_puzzles(str(tmp_path / "p.csv")) == puzzles


class _NextIsPlusOne:
    """An AR 'network' whose logits at position l put all the mass near ``(x_l + 1) mod V``, recording the
    prefix lengths it was called with."""

    def __init__(self, V: int) -> None:
        self.V, self.calls = V, []

    def __call__(self, x_BL: torch.Tensor) -> torch.Tensor:
        self.calls.append(x_BL.shape[1])
        return 20.0 * torch.nn.functional.one_hot((x_BL + 1) % self.V, self.V).float()


def test_ar_decoder_keeps_the_prompt_and_decodes_greedily():
    from udmtrain.eval.ar_decode import ARPromptDecoder

    V, L = 10, 7
    tokens = torch.tensor([[3, 0, 0, 8, 0, 0, 0], [5, 6, 0, 1, 0, 0, 0]])
    prompt = torch.tensor([[1, 0, 0, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    net = _NextIsPlusOne(V)
    out = ARPromptDecoder().sample(net, 2, L, torch.Generator().manual_seed(0), tokens, prompt_mask_BL=prompt)
    assert out.tokens_BL.tolist() == [[3, 4, 5, 8, 9, 0, 1], [5, 6, 7, 1, 2, 3, 4]]
    assert net.calls == [1, 2, 4, 5, 6] and out.nfe == 5  # position 3 is prompt in both rows: no call
    with pytest.raises(ValueError, match="position 0 must be a prompt position"):
        ARPromptDecoder().sample(net, 2, L, torch.Generator(), tokens, prompt_mask_BL=prompt.roll(1, dims=1))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        ARPromptDecoder(temperature=-1.0)


def test_ar_decoder_draws_from_the_tempered_law():
    from udmtrain.eval.ar_decode import ARPromptDecoder

    logits_V = torch.tensor([0.0, 1.0, 2.0])
    B = 20_000
    draw = ARPromptDecoder(temperature=2.0).sample(
        lambda x_BL: logits_V.expand(x_BL.shape[0], x_BL.shape[1], 3), B, 2, torch.Generator().manual_seed(1),
        torch.zeros(B, 2, dtype=torch.long), prompt_mask_BL=torch.tensor([[True, False]]).expand(B, 2))
    freq = torch.bincount(draw.tokens_BL[:, 1], minlength=3).double() / B
    p = torch.softmax(logits_V.double() / 2.0, dim=0)
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / B)), (freq, p)
