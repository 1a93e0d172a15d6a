import pytest

from server.request import Request, RequestStatus, SamplingParams


def test_defaults_are_valid_and_normalised():
    params = SamplingParams(top_k=0, stop="###", stop_token_ids=[5, 6], temperature=1)
    assert params.top_k == -1
    assert params.stop == ("###",)
    assert params.stop_token_ids == (5, 6)
    assert isinstance(params.temperature, float)
    assert not params.is_greedy and SamplingParams(temperature=0).is_greedy
    assert not params.has_penalties and SamplingParams(presence_penalty=0.5).has_penalties


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.1}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"seed": "1"}, "seed"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unbounded_max_tokens_and_bounds_accepted():
    SamplingParams(max_tokens=None, min_tokens=100, temperature=2.0, top_p=1e-9, logprobs=20)


def test_status_finished_and_reason():
    assert not RequestStatus.WAITING.is_finished and not RequestStatus.RUNNING.is_finished
    assert RequestStatus.FINISHED_LENGTH.is_finished
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.RUNNING.finish_reason is None


def test_request_counts():
    request = Request("a", [1, 2, 3])
    assert request.num_prompt_tokens == 3 and request.num_prefill_tokens_left == 3
    assert not request.is_prefill_done and request.last_token_id == 3
    request.num_computed_tokens = 3
    request.append_output_token(7)
    assert request.is_prefill_done and request.num_prefill_tokens_left == 0
    assert request.num_tokens == 4 and request.all_token_ids == [1, 2, 3, 7]
    assert request.last_token_id == 7


def test_request_needs_id_and_prompt():
    with pytest.raises(ValueError, match="prompt"):
        Request("a", [])
    with pytest.raises(ValueError, match="request_id"):
        Request("", [1])
