"""Pure policy decisions for the four Full-Duplex-Bench situations, without any model."""

from __future__ import annotations

import pytest

from duplex.policies import (BargeInRules, Continue, Listen, Observation, Pause, Resume, Speak, Yield,
                             available_policies, make_policy)


def obs(**kw) -> Observation:
    return Observation(t=10.0, **kw)


@pytest.mark.parametrize("name", ["silence", "eou", "half-duplex"])
def test_registered(name):
    assert name in available_policies()
    assert make_policy(name).name == name


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy 'nope'.*silence"):
        make_policy("nope")


def test_pause_mid_utterance_keeps_listening():
    paused = obs(silence_s=0.3, user_turn_words=6, partial_text="I'd like to book a table for", eou_prob=0.01)
    assert isinstance(make_policy("silence").decide(paused), Listen)
    assert isinstance(make_policy("eou").decide(paused), Listen)
    # the eou policy waits even longer than the silence policy when the prefix looks unfinished
    assert isinstance(make_policy("eou").decide(obs(silence_s=0.8, user_turn_words=6,
                                                    partial_text="I'd like to book a table for",
                                                    eou_prob=0.01)), Listen)


def test_smooth_end_of_turn_speaks():
    done = obs(silence_s=0.55, user_turn_words=5, partial_text="what time is it now", eou_prob=0.9)
    assert isinstance(make_policy("silence").decide(done), Speak)
    # eou reacts sooner than the fixed 500 ms gap when the model is confident
    early = obs(silence_s=0.25, user_turn_words=5, partial_text="what time is it now", eou_prob=0.9)
    assert isinstance(make_policy("eou").decide(early), Speak)
    assert isinstance(make_policy("silence").decide(early), Listen)


def test_no_reply_while_user_speaks_or_without_words():
    assert isinstance(make_policy("silence").decide(obs(user_speaking=True, user_turn_words=3, partial_text="a b c")), Listen)
    assert isinstance(make_policy("silence").decide(obs(silence_s=5.0)), Listen)


def test_typed_text_is_answered_at_once():
    assert isinstance(make_policy("silence").decide(obs(user_turn_final=True, user_turn_words=2, partial_text="hi there")), Speak)


@pytest.mark.parametrize("text", ["yeah", "mm-hm", "uh-huh", "okay", "right"])
def test_backchannel_does_not_stop_the_agent(text):
    bc = obs(agent_speaking=True, overlap_s=0.4, partial_text=text, user_turn_words=1)
    for name in ("silence", "eou"):
        action = make_policy(name).decide(bc)
        assert isinstance(action, Continue) and action.reason == "backchannel"
        # after a pause, the same judgement resumes the audio where it stopped
        resumed = make_policy(name).decide(obs(agent_speaking=True, agent_paused=True, overlap_s=0.9,
                                               partial_text=text, user_turn_words=1))
        assert isinstance(resumed, Resume) and resumed.reason == "backchannel"


def test_sound_over_the_agent_pauses_it_at_once_and_waits_for_words():
    for overlap_s in (0.05, 0.3, 0.9, 1.4):  # no words yet: paused, not yielded, up to 1.5 s
        action = make_policy("silence").decide(obs(agent_speaking=True, user_speaking=True, overlap_s=overlap_s))
        assert isinstance(action, Pause), overlap_s
    # a cough with no words at all: resume once it is over
    cough = obs(agent_speaking=True, agent_paused=True, user_speaking=False, overlap_s=0.4)
    assert isinstance(make_policy("eou").decide(cough), Resume)


@pytest.mark.parametrize("kw", [
    {"user_speaking": True, "overlap_s": 1.6, "partial_text": ""},  # long sound, no transcript yet
    {"user_speaking": True, "overlap_s": 0.7, "partial_text": "can you tell"},  # content words
    {"user_speaking": False, "overlap_s": 0.5, "partial_text": "what about tomorrow"},
    {"user_speaking": True, "overlap_s": 0.1, "partial_text": "stop"},  # stop word: at once
    {"user_speaking": True, "overlap_s": 1.6, "partial_text": "yeah"},  # "yeah" held for over 1.5 s
    {"user_speaking": False, "overlap_s": 0.4, "partial_text": "what"},  # one content word, over: a turn
])
def test_interruption_yields(kw):
    o = obs(agent_speaking=True, user_turn_words=len(kw["partial_text"].split()), **kw)
    for name in ("silence", "eou"):
        assert isinstance(make_policy(name).decide(o), Yield), (name, kw)


def test_half_duplex_never_yields():
    o = obs(agent_speaking=True, user_speaking=True, overlap_s=3.0, partial_text="stop stop please stop", user_turn_words=4)
    assert isinstance(make_policy("half-duplex").decide(o), Continue)


def test_barge_in_rules_are_configurable():
    rules = BargeInRules(backchannel_max_ms=200)
    o = obs(agent_speaking=True, user_speaking=True, overlap_s=0.25, partial_text="")
    assert isinstance(rules.decide(o), Yield)
    # without pause-first, a sound being judged lets the agent play on
    assert isinstance(BargeInRules(pause_on_overlap=False).decide(obs(agent_speaking=True, user_speaking=True,
                                                                      overlap_s=0.25)), Continue)
    assert rules.decide(obs(agent_speaking=False)) is None


def test_a_short_sound_over_the_agent_resumes_whatever_asr_made_of_it():
    rules = BargeInRules()
    ended = dict(agent_speaking=True, user_speaking=False, agent_paused=True, overlap_ended=True)
    # "uh-huh" (0.4 s) heard as "Sir Sir", or with no words yet: an acknowledgement
    assert isinstance(rules.decide(obs(overlap_s=0.4, partial_text="Sir Sir", **ended)), Resume)
    assert isinstance(rules.decide(obs(overlap_s=0.4, transcript_pending=True, **ended)), Resume)
    # a stop word, however short, yields; a longer sound with content words is a turn
    assert isinstance(rules.decide(obs(overlap_s=0.3, partial_text="wait", **ended)), Yield)
    assert isinstance(rules.decide(obs(overlap_s=1.2, partial_text="what about Paris", **ended)), Yield)
    # longer sounds still wait (bounded) for their words
    assert isinstance(rules.decide(obs(overlap_s=0.9, transcript_pending=True, silence_s=0.2, **ended)), Pause)
    # resume_sound_ms=0 turns the rule off: the short sound's content word makes it a turn again
    off = BargeInRules(resume_sound_ms=0)
    assert isinstance(off.decide(obs(overlap_s=0.4, partial_text="what", **ended)), Yield)


def test_eou_gap_interpolates_between_bounds():
    p = make_policy("eou", short_gap_ms=200, long_gap_ms=1200)
    assert p.gap_ms(0.9) == 200
    assert p.gap_ms(0.01) == 1200
    assert 200 < p.gap_ms(0.2) < 1200


def test_eou_waits_less_after_an_interruption_than_after_words_that_look_unfinished():
    p = make_policy("eou", short_gap_ms=0, long_gap_ms=1500, confident=0.2, unlikely=0.02)
    said = dict(user_turn_words=5, partial_text="No, I asked about Oslo.", eou_prob=0.03)
    assert isinstance(p.decide(obs(silence_s=0.7, **said)), Listen)  # an ordinary turn: up to 1.5 s
    assert isinstance(p.decide(obs(silence_s=0.7, after_interruption=True, **said)), Speak)
    assert isinstance(p.decide(obs(silence_s=0.4, after_interruption=True, **said)), Listen)
    assert make_policy("eou", interruption_gap_ms=1500).decide(obs(silence_s=0.7, after_interruption=True, **said)) \
        == Listen()


def test_eou_counts_a_sentence_break_as_an_end_only_after_a_finished_sentence():
    """Read prose: the model gives "\n" 0.26 and its footer 0.03 after "...to do for them.". With
    ``sentence_breaks`` the two add up when the words end a sentence, never after a trailing
    "..." or mid-phrase, and the setting is off by default."""
    p = make_policy("eou", short_gap_ms=0, long_gap_ms=1500, confident=0.25, unlikely=0.02, sentence_breaks=True)
    finished = dict(user_turn_words=9, partial_text="how much he could do for them.", eou_prob=0.03,
                    sentence_break_prob=0.26)
    assert p.belief(obs(**finished)) == pytest.approx(0.29)
    assert isinstance(p.decide(obs(silence_s=0.05, **finished)), Speak)
    trailing = dict(finished, partial_text="so my plan for tomorrow is to...")
    assert p.belief(obs(**trailing)) == 0.03 and isinstance(p.decide(obs(silence_s=0.05, **trailing)), Listen)
    assert isinstance(p.decide(obs(silence_s=0.05, **dict(finished, partial_text="I need a gift for"))), Listen)
    assert make_policy("eou", short_gap_ms=0, long_gap_ms=1500, confident=0.25, unlikely=0.02).belief(
        obs(**finished)) == 0.03
    assert p.belief(obs(**dict(finished, sentence_break_prob=None))) == 0.03  # not computed: the footer alone


def test_ends_sentence_reads_whisper_punctuation():
    from duplex.policies.simple import ends_sentence

    assert [ends_sentence(t) for t in ("He was kind.", "Where to?", "Wow!", 'He said "go."')] == [True] * 4
    assert [ends_sentence(t) for t in ("So my plan is to...", "a gift for\u2026", "for them", "")] == [False] * 4


def test_learned_waits_at_most_the_interruption_gap_after_an_interruption():
    p = make_policy("learned", threshold=1.0)  # the model alone never speaks: only the caps do
    said = dict(user_turn_words=5, partial_text="No, I asked about Oslo.", eou_prob=0.03)
    assert isinstance(p.decide(obs(silence_s=0.7, **said)), Listen)  # an ordinary turn: up to max_gap_ms
    assert isinstance(p.decide(obs(silence_s=0.7, after_interruption=True, **said)), Speak)
    assert isinstance(p.decide(obs(silence_s=0.4, after_interruption=True, **said)), Listen)
    assert isinstance(p.decide(obs(silence_s=2.1, **said)), Speak)


def test_agent_backchannels_only_when_enabled_while_the_user_talks_at_length():
    from duplex.policies import Backchannel

    talking = obs(user_speaking=True, user_speech_s=4.5, user_turn_words=9, partial_text="so then I went to")
    assert isinstance(make_policy("eou").decide(talking), Listen)  # off by default
    for name in ("eou", "silence"):
        p = make_policy(name, backchannel_every_s=4.0)
        assert isinstance(p.decide(talking), Backchannel)
        again = obs(user_speaking=True, user_speech_s=6.0, since_agent_backchannel_s=1.5)
        assert isinstance(p.decide(again), Listen)  # at most one per 4 s of the user's speech
        assert isinstance(p.decide(obs(user_speaking=True, user_speech_s=2.0)), Listen)  # too early
        assert not isinstance(p.decide(obs(user_speaking=True, user_speech_s=9.0, agent_speaking=True)),
                              Backchannel)  # never over its own speech


def test_an_ended_overlap_waits_for_its_final_words_before_resuming_or_yielding():
    pending = obs(agent_speaking=True, agent_paused=True, overlap_s=0.6, silence_s=0.4, transcript_pending=True)
    assert isinstance(make_policy("eou").decide(pending), Pause)
    # the words arrive: "mm-hm" resumes; a slow recogniser is not waited for past words_wait_ms
    done = obs(agent_speaking=True, agent_paused=True, overlap_s=0.6, silence_s=0.9, partial_text="mm-hm")
    assert isinstance(make_policy("eou").decide(done), Resume)
    stuck = obs(agent_speaking=True, agent_paused=True, overlap_s=0.6, silence_s=1.6, transcript_pending=True)
    assert isinstance(make_policy("eou").decide(stuck), Resume)


def test_low_confidence_words_of_a_short_sound_over_the_agent_do_not_yield():
    """Whisper's guesses at half a second of "yeah yeah" ("You are you", mean probability ~0.3)
    are judged as a sound without words; the same words heard confidently are a turn."""
    rules = BargeInRules()
    guess = dict(agent_speaking=True, user_speaking=True, overlap_s=0.8, partial_text="You are you",
                 user_turn_words=3, agent_paused=True)
    assert isinstance(rules.decide(obs(**guess, word_confidence=0.3)), Pause)
    assert isinstance(rules.decide(obs(**guess, word_confidence=0.95)), Yield)
    assert isinstance(rules.decide(obs(**guess)), Yield)  # no confidence known (typed, other ASR): as before
    # once over, it resumes like any short sound
    ended = dict(guess, user_speaking=False, overlap_ended=True, silence_s=0.3)
    assert isinstance(rules.decide(obs(**ended, word_confidence=0.3)), Resume)
    # a stop word still stops the agent, however unsure; a longer sound's words count again
    assert isinstance(rules.decide(obs(**dict(guess, partial_text="no wait"), word_confidence=0.2)), Yield)
    assert isinstance(rules.decide(obs(**dict(guess, overlap_s=1.2), word_confidence=0.3)), Yield)
    assert isinstance(BargeInRules(min_word_confidence=0.0).decide(obs(**guess, word_confidence=0.3)), Yield)
