"""Split lists: the real UCF-101 files, and clear errors for broken ones."""
import os

import pytest

from helperFunctions import check_clips_on_disk, clip_group, read_class_index, read_split
from ucf.extraction import clip_stem
from ucf.errors import DataError


def test_real_class_index(real_lists):
    classes = read_class_index(real_lists)
    assert len(classes) == 101
    assert classes[0] == 'ApplyEyeMakeup' and classes[36] == 'HandstandPushups' and classes[100] == 'YoYo'


@pytest.mark.parametrize('split,n_train,n_test', [(1, 9537, 3783), (2, 9586, 3734), (3, 9624, 3696)])
def test_real_splits(real_lists, split, n_train, n_test):
    train, test = read_split(real_lists, split, 'train'), read_split(real_lists, split, 'test')
    assert (len(train), len(test)) == (n_train, n_test)
    assert len({c.path for c in train} | {c.path for c in test}) == 13320
    assert {c.label for c in train} == {c.label for c in test} == set(range(101))
    # Groups never straddle train and test, and the test groups are UCF's 7 per split.
    train_groups = {(c.label, clip_group(c.path)) for c in train}
    test_groups = {(c.label, clip_group(c.path)) for c in test}
    assert not train_groups & test_groups
    assert {g for _, g in test_groups} == set(range(7 * split - 6, 7 * split + 1))


def test_handstand_pushups_quirk(real_lists):
    classes = read_class_index(real_lists)
    clips = [c for c in read_split(real_lists, 1, 'test') if c.path.startswith('HandstandPushups/')]
    assert clips and all(os.path.basename(c.path).startswith('v_HandStandPushups_') for c in clips)
    assert {classes[c.label] for c in clips} == {'HandstandPushups'}


def write_lists(folder, classind, trainlist, testlist='A/v_A_g01_c01.avi\n'):
    os.makedirs(folder, exist_ok=True)
    for name, text in [('classInd.txt', classind), ('trainlist01.txt', trainlist), ('testlist01.txt', testlist)]:
        with open(os.path.join(folder, name), 'w', newline='') as f:
            f.write(text)
    return str(folder)


@pytest.mark.parametrize('classind,trainlist,message', [
    ('1 A\r\n2 B\r\n', 'A/v_A_g08_c01.avi\r\n', 'trainlist01.txt:1: expected'),
    ('1 A\n2 B\n', 'A/v_A_g08_c01.avi 1\nC/v_C_g08_c01.avi 1\n', "trainlist01.txt:2: class folder 'C'"),
    ('1 A\n2 B\n', 'A/v_A_g08_c01.avi 2\n', "index 2 is class 'B'"),
    ('1 A\n2 B\n', 'A/v_B_g08_c01.avi 1\n', "named for class 'B' but listed in folder 'A'"),
    ('1 A\n2 B\n', 'A/v_A_g08_c01.txt 1\n', "extension '.txt', which is not a video container"),
    ('1 A\n2 B\n', 'A/A_g08_c01.avi 1\n', 'is not of the form v_<Class>_gGG_cCC'),
    ('1 A\n3 B\n', 'A/v_A_g08_c01.avi 1\n', 'without gaps'),
    ('1 A\n2\n', 'A/v_A_g08_c01.avi 1\n', 'classInd.txt:2: expected'),
    ('1 A\n2 B\n', 'A/v_A_g08_c01.avi 1\nA/v_A_g08_c01.avi 1\n', 'listed twice'),
])
def test_malformed_lists_name_file_and_line(tmp_path, classind, trainlist, message):
    folder = write_lists(tmp_path, classind, trainlist)
    with pytest.raises(DataError, match=message.replace('(', r'\(')):
        read_split(folder, 1, 'train')


def test_crlf_and_lf_read_the_same(tmp_path):
    lf = write_lists(tmp_path / 'lf', '1 A\n2 B\n', 'A/v_A_g08_c01.avi 1\nB/v_B_g09_c02.avi 2\n')
    crlf = write_lists(tmp_path / 'crlf', '1 A\r\n2 B\r\n', 'A/v_A_g08_c01.avi 1\r\nB/v_B_g09_c02.avi 2\r\n')
    assert read_split(lf, 1, 'train') == read_split(crlf, 1, 'train')
    assert [c.label for c in read_split(lf, 1, 'train')] == [0, 1]


@pytest.mark.parametrize('extension', ['.avi', '.mp4', '.mkv', '.webm', '.mov', '.MP4'])
def test_lists_may_name_any_video_container(tmp_path, extension):
    folder = write_lists(tmp_path, '1 A\n2 B\n', f'A/v_A_g08_c01{extension} 1\nB/v_B_g09_c02.avi 2\n')
    clips = read_split(folder, 1, 'train')
    assert [c.path for c in clips] == [f'A/v_A_g08_c01{extension}', 'B/v_B_g09_c02.avi']
    assert clip_stem(clips[0].path) == 'A/v_A_g08_c01' and clip_group(clips[0].path) == 8


def test_missing_split_file_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match='classInd.txt: split file not found.*--lists'):
        read_split(str(tmp_path), 1, 'train')


def test_missing_clips_on_disk(tiny_ucf, tmp_path):
    root, _ = tiny_ucf
    lists = os.path.join(root, 'ucfTrainTestlist')
    clips = read_split(lists, 1, 'train')
    with pytest.raises(DataError, match='data folder not found'):
        check_clips_on_disk(str(tmp_path / 'nowhere'), clips)
    data = os.path.join(root, 'UCF-101')
    assert check_clips_on_disk(data, clips) == clips
    fake = clips + [clips[0]._replace(path=clips[0].path.replace('_c01', '_c09'))]
    with pytest.raises(DataError, match='1 of .* listed clips are missing.*_c09.*--skip-missing'):
        check_clips_on_disk(data, fake)
    assert check_clips_on_disk(data, fake, allow_missing=True) == clips


def test_whole_numbers_may_be_written_in_scientific_notation():
    """`--hidden 1e9` was refused as "'1e9' is not a number"; it is a whole number, checked as such."""
    import argparse

    from ucf.flags import positive_int
    assert positive_int('1e3') == 1000 and positive_int('64') == 64 and isinstance(positive_int('1e3'), int)
    for text, message in (('2.5', 'not a positive whole number'), ('0', 'not a positive whole number'),
                          ('-1e3', 'not a positive whole number'), ('inf', 'not a positive whole number'),
                          ('lots', 'is not a number')):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(text)
