"""Small Python tasks for the real-model quality benchmark (bench/bench_llm_quality.py).

Each task is a file ``solution.py`` (a stub or a buggy version), a pytest file
``test_solution.py`` that fails on it, the instruction given to the model, and a
reference solution that passes (``bench_llm_quality.py --check-tasks`` proves both for
every task). Written for this repository: functions and small bug fixes a
135M-parameter model can sometimes get right, so that choosing among samples matters.
"""

from __future__ import annotations

import attrs

__all__ = ["FILE", "TASKS", "TEST_FILE", "Task"]

FILE = "solution.py"
TEST_FILE = "test_solution.py"


@attrs.frozen
class Task:
    name: str
    start: str  # solution.py as the model finds it
    test: str  # test_solution.py
    instruction: str
    reference: str  # a solution.py that passes

    def prompt(self) -> str:
        return (f"Here is {FILE}:\n```python\n{self.start}```\n{self.instruction} "
                f"Reply with only the corrected {FILE} in one ```python block.")


def _task(name: str, start: str, checks: str, instruction: str, reference: str,
          imports: str) -> Task:
    body = "\n".join(f"    {line}" for line in checks.strip().splitlines())
    test = f"from solution import {imports}\n\n\ndef test_{name}():\n{body}\n"
    return Task(name, start, test, instruction, reference)


TASKS: tuple[Task, ...] = (
    _task("add", "def add(a, b):\n    return a - b\n",
          "assert add(2, 3) == 5\nassert add(-1, 1) == 0",
          "add(a, b) must return a + b.", "def add(a, b):\n    return a + b\n", "add"),
    _task("multiply", "def multiply(a, b):\n    return a + b\n",
          "assert multiply(3, 4) == 12\nassert multiply(0, 9) == 0",
          "multiply(a, b) must return the product of a and b.",
          "def multiply(a, b):\n    return a * b\n", "multiply"),
    _task("is_even", "def is_even(n):\n    return n % 2 == 1\n",
          "assert is_even(4)\nassert not is_even(7)\nassert is_even(0)",
          "is_even(n) must return True when n is even.",
          "def is_even(n):\n    return n % 2 == 0\n", "is_even"),
    _task("largest", "def largest(numbers):\n    pass\n",
          "assert largest([3, 9, 2]) == 9\nassert largest([-5, -2]) == -2",
          "Implement largest(numbers): the largest number of a non-empty list.",
          "def largest(numbers):\n    return max(numbers)\n", "largest"),
    _task("reverse", "def reverse(text):\n    return text\n",
          "assert reverse('abc') == 'cba'\nassert reverse('') == ''",
          "reverse(text) must return the string reversed.",
          "def reverse(text):\n    return text[::-1]\n", "reverse"),
    _task("factorial",
          "def factorial(n):\n    result = 1\n    for i in range(1, n):\n        result *= i\n"
          "    return result\n",
          "assert factorial(5) == 120\nassert factorial(0) == 1\nassert factorial(1) == 1",
          "factorial(n) must return n! (the loop stops one too early).",
          "def factorial(n):\n    result = 1\n    for i in range(1, n + 1):\n"
          "        result *= i\n    return result\n", "factorial"),
    _task("count_vowels", "def count_vowels(text):\n    pass\n",
          "assert count_vowels('hello') == 2\nassert count_vowels('xyz') == 0\n"
          "assert count_vowels('AEIOU') == 5",
          "Implement count_vowels(text): how many of a, e, i, o, u (any case) it holds.",
          "def count_vowels(text):\n    return sum(c in 'aeiouAEIOU' for c in text)\n",
          "count_vowels"),
    _task("total", "def total(numbers):\n    s = 1\n    for x in numbers:\n        s += x\n"
          "    return s\n",
          "assert total([1, 2, 3]) == 6\nassert total([]) == 0",
          "total(numbers) must return the sum of the list.",
          "def total(numbers):\n    return sum(numbers)\n", "total"),
    _task("square", "def square(x):\n    return x * 2\n",
          "assert square(3) == 9\nassert square(-4) == 16",
          "square(x) must return x squared.", "def square(x):\n    return x * x\n",
          "square"),
    _task("is_palindrome", "def is_palindrome(text):\n    pass\n",
          "assert is_palindrome('racecar')\nassert not is_palindrome('abc')\n"
          "assert is_palindrome('')",
          "Implement is_palindrome(text): True when text reads the same backwards.",
          "def is_palindrome(text):\n    return text == text[::-1]\n", "is_palindrome"),
    _task("to_fahrenheit", "def to_fahrenheit(celsius):\n    return celsius * 9 / 5\n",
          "assert to_fahrenheit(0) == 32\nassert to_fahrenheit(100) == 212",
          "to_fahrenheit(celsius) must convert Celsius to Fahrenheit (it forgets the 32).",
          "def to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32\n", "to_fahrenheit"),
    _task("absolute", "def absolute(x):\n    return x\n",
          "assert absolute(-3) == 3\nassert absolute(4) == 4\nassert absolute(0) == 0",
          "absolute(x) must return the absolute value of x.",
          "def absolute(x):\n    return -x if x < 0 else x\n", "absolute"),
    _task("smaller", "def smaller(a, b):\n    return a if a > b else b\n",
          "assert smaller(2, 7) == 2\nassert smaller(9, 1) == 1",
          "smaller(a, b) must return the smaller of the two.",
          "def smaller(a, b):\n    return a if a < b else b\n", "smaller"),
    _task("first", "def first(items):\n    return items[1]\n",
          "assert first([4, 5, 6]) == 4\nassert first(['a']) == 'a'",
          "first(items) must return the first element of the list.",
          "def first(items):\n    return items[0]\n", "first"),
    _task("last", "def last(items):\n    return items[0]\n",
          "assert last([4, 5, 6]) == 6\nassert last(['a']) == 'a'",
          "last(items) must return the last element of the list.",
          "def last(items):\n    return items[-1]\n", "last"),
    _task("join_words", "def join_words(a, b):\n    return a + b\n",
          "assert join_words('hello', 'world') == 'hello world'",
          "join_words(a, b) must return the two words with one space between them.",
          "def join_words(a, b):\n    return a + ' ' + b\n", "join_words"),
    _task("is_positive", "def is_positive(x):\n    return x >= 0\n",
          "assert is_positive(3)\nassert not is_positive(0)\nassert not is_positive(-2)",
          "is_positive(x) must return True only for numbers greater than zero.",
          "def is_positive(x):\n    return x > 0\n", "is_positive"),
    _task("doubled", "def doubled(numbers):\n    pass\n",
          "assert doubled([1, 2, 3]) == [2, 4, 6]\nassert doubled([]) == []",
          "Implement doubled(numbers): a new list with every number times two.",
          "def doubled(numbers):\n    return [2 * x for x in numbers]\n", "doubled"),
    _task("count", "def count(items, x):\n    pass\n",
          "assert count([1, 2, 1, 1], 1) == 3\nassert count([], 5) == 0",
          "Implement count(items, x): how many times x occurs in the list.",
          "def count(items, x):\n    return items.count(x)\n", "count"),
    _task("average", "def average(numbers):\n    return sum(numbers)\n",
          "assert average([2, 4, 6]) == 4\nassert average([5]) == 5",
          "average(numbers) must return the mean of a non-empty list.",
          "def average(numbers):\n    return sum(numbers) / len(numbers)\n", "average"),
    _task("shout", "def shout(text):\n    return text.lower()\n",
          "assert shout('hi') == 'HI'\nassert shout('Ok!') == 'OK!'",
          "shout(text) must return the text in upper case.",
          "def shout(text):\n    return text.upper()\n", "shout"),
    _task("fibonacci", "def fibonacci(n):\n    pass\n",
          "assert fibonacci(0) == 0\nassert fibonacci(1) == 1\nassert fibonacci(10) == 55",
          "Implement fibonacci(n): the n-th Fibonacci number, fibonacci(0) == 0, "
          "fibonacci(1) == 1.",
          "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
          "    return a\n", "fibonacci"),
    _task("greet", "def greet(name):\n    return 'Hello ' + name\n",
          "assert greet('Ada') == 'Hello, Ada!'",
          "greet(name) must return 'Hello, NAME!' (a comma and an exclamation mark).",
          "def greet(name):\n    return 'Hello, ' + name + '!'\n", "greet"),
    _task("clamp", "def clamp(x, low, high):\n    return x\n",
          "assert clamp(5, 0, 3) == 3\nassert clamp(-1, 0, 3) == 0\nassert clamp(2, 0, 3) == 2",
          "clamp(x, low, high) must limit x to the range low..high.",
          "def clamp(x, low, high):\n    return max(low, min(x, high))\n", "clamp"),
    _task("power", "def power(base, exponent):\n    return base * exponent\n",
          "assert power(2, 10) == 1024\nassert power(5, 0) == 1",
          "power(base, exponent) must return base raised to exponent.",
          "def power(base, exponent):\n    return base ** exponent\n", "power"),
    _task("no_spaces", "def no_spaces(text):\n    pass\n",
          "assert no_spaces('a b  c') == 'abc'\nassert no_spaces('') == ''",
          "Implement no_spaces(text): the text with every space removed.",
          "def no_spaces(text):\n    return text.replace(' ', '')\n", "no_spaces"),
    _task("is_empty", "def is_empty(items):\n    return len(items) == 1\n",
          "assert is_empty([])\nassert not is_empty([0])",
          "is_empty(items) must return True for an empty list.",
          "def is_empty(items):\n    return len(items) == 0\n", "is_empty"),
    _task("sign", "def sign(x):\n    pass\n",
          "assert sign(-7) == -1\nassert sign(0) == 0\nassert sign(3) == 1",
          "Implement sign(x): -1 for negative numbers, 0 for zero, 1 for positive.",
          "def sign(x):\n    return (x > 0) - (x < 0)\n", "sign"),
    _task("gcd", "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return b\n",
          "assert gcd(12, 18) == 6\nassert gcd(7, 5) == 1",
          "gcd(a, b) must return the greatest common divisor (it returns the wrong "
          "variable).",
          "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n", "gcd"),
    _task("contains", "def contains(items, x):\n    return False\n",
          "assert contains([1, 2, 3], 2)\nassert not contains([], 1)",
          "contains(items, x) must return True when x is in the list.",
          "def contains(items, x):\n    return x in items\n", "contains"),
    _task("word_count", "def word_count(text):\n    return len(text)\n",
          "assert word_count('one two three') == 3\nassert word_count('') == 0",
          "word_count(text) must return the number of words separated by spaces.",
          "def word_count(text):\n    return len(text.split())\n", "word_count"),
    _task("evens", "def evens(numbers):\n    pass\n",
          "assert evens([1, 2, 3, 4]) == [2, 4]\nassert evens([1, 3]) == []",
          "Implement evens(numbers): the even numbers of the list, in order.",
          "def evens(numbers):\n    return [x for x in numbers if x % 2 == 0]\n", "evens"),
)
