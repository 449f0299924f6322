"""Bad input gets a clear exception at the call site, on every backend.

Each test checks the exception type and that its message says what was wrong
(which argument, which option, which resource), since that is the promise.
"""
from __future__ import annotations

import threading

import pytest

import beamlet as ray
import procs
from beamlet import exceptions as E


@ray.remote
def echo(x=None, **kwargs):
    return x


@ray.remote(num_returns=2)
def returns_one_value():
    return 1


@ray.remote(num_returns=3)
def returns_two_values():
    return 1, 2


@ray.remote
class Box:
    def __init__(self, value=None):
        self.value = value

    def put(self, value):
        self.value = value

    def get(self):
        return self.value


def plain_function(x):
    return x


class PlainClass:
    pass


# -- calling things the wrong way ------------------------------------------------------

def test_calling_remote_function_directly(backend):
    with pytest.raises(TypeError, match=r"echo\.remote\(\)"):
        echo(1)


def test_instantiating_actor_class_directly(backend):
    with pytest.raises(TypeError, match=r"Box\.remote\(\)"):
        Box()


def test_calling_actor_method_directly(backend):
    box = Box.remote()
    with pytest.raises(TypeError, match=r"get\.remote\(\)"):
        box.get()


def test_remote_on_a_non_remote_function(backend):
    with pytest.raises(AttributeError, match="remote"):
        plain_function.remote(1)
    with pytest.raises(AttributeError, match="remote"):
        PlainClass.remote()


def test_unknown_actor_method(backend):
    box = Box.remote()
    with pytest.raises(AttributeError, match="no_such_method"):
        box.no_such_method.remote()


def test_remote_decorator_on_a_non_callable(backend):
    with pytest.raises(TypeError, match="function or class"):
        ray.remote(42)
    with pytest.raises(TypeError, match="function or class"):
        ray.remote("not code", num_cpus=1)


# -- arguments that cannot be serialized --------------------------------------------------

def test_unpicklable_positional_argument_is_named(backend):
    lock = threading.Lock()
    with pytest.raises(TypeError) as info:
        echo.remote(lock)
    text = str(info.value)
    assert "echo" in text
    assert "argument 0" in text
    assert "lock" in text


def test_unpicklable_keyword_argument_is_named(backend):
    with pytest.raises(TypeError) as info:
        echo.remote(1, the_lock=threading.Lock())
    assert "'the_lock'" in str(info.value)
    assert "echo" in str(info.value)


def test_unpicklable_actor_arguments_are_named(backend):
    with pytest.raises(TypeError) as info:
        Box.remote(threading.Lock())
    assert "Box" in str(info.value) and "argument 0" in str(info.value)
    box = Box.remote()
    with pytest.raises(TypeError) as info:
        box.put.remote(value=threading.Lock())
    assert "'value'" in str(info.value)
    assert ray.get(box.get.remote()) is None  # the bad call never reached the actor


def test_unpicklable_value_to_put(backend):
    with pytest.raises(TypeError, match="lock"):
        ray.put(threading.Lock())


def test_put_of_an_object_ref(backend):
    with pytest.raises(TypeError, match="ObjectRef"):
        ray.put(ray.put(1))


# -- get / wait / cancel / kill with the wrong things -------------------------------------

@pytest.mark.parametrize("value", [5, "ref", None, {"a": 1}])
def test_get_of_a_non_ref(backend, value):
    with pytest.raises(ValueError, match="ObjectRef"):  # (as in Ray)
        ray.get(value)


def test_get_of_a_list_holding_a_non_ref(backend):
    with pytest.raises(TypeError, match="int"):
        ray.get([ray.put(1), 2])


def test_get_with_negative_timeout(backend):
    with pytest.raises(ValueError, match="timeout"):
        ray.get(ray.put(1), timeout=-1)


def test_wait_with_duplicate_refs(backend):
    ref = ray.put(1)
    with pytest.raises(ValueError, match="duplicate"):
        ray.wait([ref, ref])


def test_wait_num_returns_larger_than_refs(backend):
    refs = [ray.put(1), ray.put(2)]
    with pytest.raises(ValueError, match="num_returns"):
        ray.wait(refs, num_returns=3)


@pytest.mark.parametrize("num_returns", [0, -1, 1.5])
def test_wait_invalid_num_returns(backend, num_returns):
    with pytest.raises(ValueError, match="num_returns"):
        ray.wait([ray.put(1)], num_returns=num_returns)


def test_wait_on_non_refs(backend):
    with pytest.raises(TypeError):
        ray.wait(ray.put(1))  # a single ref, not a list
    with pytest.raises(TypeError, match="int"):
        ray.wait([1])


def test_cancel_and_kill_with_wrong_types(backend):
    with pytest.raises(TypeError, match="ObjectRef"):
        ray.cancel("not a ref")
    with pytest.raises(TypeError, match="ActorHandle"):
        ray.kill(ray.put(1))


def test_get_actor_with_bad_names(backend):
    with pytest.raises(ValueError):
        ray.get_actor("")
    with pytest.raises(ValueError, match="never-created"):
        ray.get_actor("never-created")


# -- options and resources ---------------------------------------------------------------

def test_unknown_option_on_decorator(backend):
    with pytest.raises(ValueError, match="'colour'"):
        ray.remote(colour="red")(plain_function)


def test_unknown_option_on_options(backend):
    with pytest.raises(ValueError, match="'num_cpu'") as info:
        echo.options(num_cpu=1)
    assert "num_cpus" in str(info.value)  # the message lists the valid ones


def test_task_only_option_on_actor(backend):
    with pytest.raises(ValueError, match="'num_returns'"):
        Box.options(num_returns=2)


def test_unknown_option_on_method(backend):
    with pytest.raises(ValueError, match="'num_cpus'"):
        ray.method(num_cpus=1)
    with pytest.raises(ValueError, match="'bogus'"):
        Box.remote().get.options(bogus=True)


@pytest.mark.parametrize("options, needle", [
    ({"num_cpus": -1}, "num_cpus"),
    ({"num_gpus": -0.5}, "num_gpus"),
    ({"resources": {"widget": -1}}, "widget"),
    ({"num_returns": -1}, "num_returns"),
    ({"max_retries": -2}, "max_retries"),
])
def test_invalid_option_values(backend, options, needle):
    with pytest.raises(ValueError, match=needle):
        echo.options(**options)


def test_non_numeric_resource_amount(backend):
    with pytest.raises(TypeError, match="num_cpus"):
        echo.options(num_cpus="two")


def test_cpu_and_gpu_go_through_their_own_options(backend):
    with pytest.raises(ValueError, match="num_cpus"):
        echo.options(resources={"CPU": 1})
    with pytest.raises(ValueError, match="num_gpus"):
        echo.options(resources={"GPU": 1})


def test_unknown_resource_raises_at_remote(backend):
    with pytest.raises(ValueError, match="'TPU'"):
        echo.options(resources={"TPU": 1}).remote()


def test_resource_request_larger_than_cluster(backend):
    with pytest.raises(ValueError, match="CPU") as info:
        echo.options(num_cpus=64).remote()
    assert "64" in str(info.value)
    with pytest.raises(ValueError, match="GPU"):
        echo.options(num_gpus=1).remote()


def test_actor_with_infeasible_resources(backend):
    with pytest.raises(ValueError, match="'TPU'"):
        Box.options(resources={"TPU": 1}).remote()


def test_rejected_named_actor_does_not_keep_its_name(backend):
    with pytest.raises(ValueError, match="'TPU'"):
        Box.options(name="box", resources={"TPU": 1}).remote()
    with pytest.raises(TypeError, match="argument 0"):
        Box.options(name="box").remote(threading.Lock())
    with pytest.raises(ValueError):
        ray.get_actor("box")  # no actor was created
    box = Box.options(name="box").remote(5)  # so the name is free
    assert ray.get(ray.get_actor("box").get.remote()) == 5
    assert ray.get_actor("box") == box


def test_invalid_max_concurrency(backend):
    with pytest.raises(ValueError, match="max_concurrency"):
        Box.options(max_concurrency=0)


def test_retry_exceptions_must_be_bool_or_exception_types(backend):
    with pytest.raises(TypeError, match="retry_exceptions"):
        echo.options(retry_exceptions=["ValueError"])


# -- what a function returned does not match num_returns ----------------------------------

def test_num_returns_with_a_non_sequence(backend):
    refs = returns_one_value.remote()
    for ref in refs:
        with pytest.raises(ValueError, match="num_returns=2") as info:
            ray.get(ref)
        assert isinstance(info.value, E.TaskError)
        assert "returns_one_value" in str(info.value)


def test_num_returns_with_the_wrong_length(backend):
    refs = returns_two_values.remote()
    assert len(refs) == 3
    with pytest.raises(ValueError, match="num_returns=3") as info:
        ray.get(refs)
    assert "2 values" in str(info.value)



# -- init -----------------------------------------------------------------------------------

def test_init_twice_raises(backend):
    with pytest.raises(RuntimeError, match="ignore_reinit_error"):
        ray.init(backend=backend.name)
    assert ray.get(echo.remote(1)) == 1  # the running backend is unharmed


def test_unknown_backend_lists_installed_ones(no_backend):
    with pytest.raises(ValueError) as info:
        ray.init(backend="no-such-backend")
    text = str(info.value)
    assert "no-such-backend" in text
    assert "inprocess" in text and "local" in text
    assert not ray.is_initialized()


def test_unknown_backend_from_env_var(no_backend, monkeypatch):
    monkeypatch.setenv("BEAMLET_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        ray.init()
    assert not ray.is_initialized()


def test_local_mode_with_another_backend(no_backend):
    with pytest.raises(ValueError, match="local_mode"):
        ray.init(backend="local", local_mode=True)
    assert not ray.is_initialized()


@pytest.mark.parametrize("options, needle", [
    ({"num_cpus": -1}, "num_cpus"),
    ({"num_gpus": -2}, "num_gpus"),
    ({"resources": {"widget": -1}}, "widget"),
    ({"resources": {"CPU": 4}}, "num_cpus"),
])
def test_init_with_bad_resources(no_backend, options, needle):
    with pytest.raises(ValueError, match=needle):
        ray.init(backend="inprocess", **options)
    assert not ray.is_initialized()


def test_init_with_bad_namespace(no_backend):
    with pytest.raises(TypeError, match="namespace"):
        ray.init(backend="inprocess", namespace=42)
    assert not ray.is_initialized()


@pytest.mark.parametrize("name", ["inprocess", "local"])
def test_ref_from_a_previous_session(start_backend, name):
    start_backend(name)
    stale = ray.put("from the first session")
    ray.shutdown()
    start_backend(name)
    with pytest.raises(E.ObjectLostError, match="shut down"):
        ray.get(stale, timeout=10)
    with pytest.raises(E.ObjectLostError, match="shut down"):
        ray.wait([stale], timeout=0)


@pytest.mark.parametrize("name", ["inprocess", "local"])
def test_unknown_init_option_is_named(no_backend, name):
    with pytest.raises(ValueError, match="'no_such_option'"):
        ray.init(backend=name, no_such_option=1)
    assert not ray.is_initialized()


def test_rays_init_options_without_meaning_here_are_accepted(no_backend):
    ray.init(backend="inprocess", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    assert ray.is_initialized()
    ray.shutdown()


@pytest.mark.parametrize("url, needle", [("nope://host:1", "'nope'"), ("not a url", "URL")])
def test_bad_control_store_url(no_backend, url, needle):
    with pytest.raises(ValueError, match=needle):
        ray.init(backend="inprocess", control_store=url)
    assert not ray.is_initialized()


def test_bad_object_store_memory(no_backend):
    with pytest.raises(ValueError, match="object_store_memory"):
        ray.init(backend="local", object_store_memory=-5)
    assert not ray.is_initialized()


# A bad value for a local-backend option is named in the error, raised before the
# zygote or the I/O thread starts, so nothing is left running.
BAD_OPTION_DRIVER = """
import json, os, sys, threading, time
import beamlet as ray
import procs

option = json.loads(sys.argv[1])
try:
    ray.init(backend="local", num_cpus=2, **option)
    print("ERROR none", flush=True)
except (TypeError, ValueError) as err:
    print("ERROR " + json.dumps(str(err)), flush=True)
procs.wait_until(lambda: not procs.children_of(os.getpid()), 5)
print("LEFT " + json.dumps({"children": procs.children_of(os.getpid()),
                           "io_threads": [t.name for t in threading.enumerate()
                                          if t.name == "beamlet-io"]}), flush=True)
"""


@pytest.mark.parametrize("option", [{"prestart_workers": "2"}, {"max_workers": "many"}])
def test_bad_local_option_is_named_and_leaves_nothing_running(tmp_path, option):
    import json
    import subprocess
    import sys
    script = tmp_path / "driver.py"
    script.write_text(BAD_OPTION_DRIVER)
    out = subprocess.run([sys.executable, str(script), json.dumps(option)], capture_output=True,
                         text=True, timeout=60, env=procs.driver_env(), cwd=str(tmp_path))
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert "ERROR" in lines and "LEFT" in lines, (out.stdout, out.stderr[-2000:])
    assert next(iter(option)) in lines["ERROR"], lines["ERROR"]  # the error names the option
    assert json.loads(lines["LEFT"]) == {"children": [], "io_threads": []}, lines["LEFT"]
